"""Which GPUs serve which replica: `[[runtimes]] gpus`, the runtime's own labels or the discovered
GPUs become its targets' `gpu_uuid` label, in that order of precedence."""

from __future__ import annotations

from infermesh.core.model import Labels, ModelStateDelta, TargetKey
from infermesh.core.scoring.gpu_map import GpuAssigner, gpu_label
from infermesh.core.scoring.state import StateStore

KEY = TargetKey("m", "n1", "http://a")


def test_the_label_lists_the_configured_uuids_in_order() -> None:
    assert gpu_label(["GPU-b", " GPU-a ", ""]) == "GPU-b,GPU-a"


def test_configured_gpus_label_every_target_of_the_runtime_and_override_discovery() -> None:
    store = StateStore()
    assign = GpuAssigner("GPU-1,GPU-2", store.get_model).assign
    # A first delta without labels gets labels naming the GPUs.
    store.apply_model_delta(assign(ModelStateDelta(KEY, 1, {"running": 1.0})))
    state = store.get_model(KEY)
    assert state is not None
    assert state.labels.gpu_uuid == "GPU-1,GPU-2"
    # Later deltas without labels keep them; labels from the adapter get the configured GPUs.
    store.apply_model_delta(assign(ModelStateDelta(KEY, 2, {"running": 2.0})))
    discovered = Labels(runtime="triton", gpu_uuid="GPU-9")
    store.apply_model_delta(assign(ModelStateDelta(KEY, 3, {"labels": discovered})))
    state = store.get_model(KEY)
    assert state is not None
    assert (state.labels.runtime, state.labels.gpu_uuid) == ("triton", "GPU-1,GPU-2")
    assert [g.key.gpu_uuid for g in store.gpus_for(state)] == []  # no GPU telemetry yet


def test_without_configured_gpus_deltas_pass_unchanged() -> None:
    delta = ModelStateDelta(KEY, 1, {"labels": Labels(gpu_uuid="GPU-9")})
    assert GpuAssigner("", StateStore().get_model).assign(delta) is delta


def test_discovered_gpus_land_with_the_next_delta_unless_the_runtime_reports_its_own() -> None:
    store = StateStore()
    assigner = GpuAssigner("", store.get_model)
    store.apply_model_delta(assigner.assign(ModelStateDelta(KEY, 1, {"labels": Labels()})))
    assigner.discovered = "GPU-3,GPU-4"
    # The next delta, without labels, carries the stored labels with the discovered GPUs.
    store.apply_model_delta(assigner.assign(ModelStateDelta(KEY, 2, {"running": 1.0})))
    state = store.get_model(KEY)
    assert state is not None
    assert state.labels.gpu_uuid == "GPU-3,GPU-4"
    unchanged = ModelStateDelta(KEY, 3, {"running": 2.0})
    assert assigner.assign(unchanged) is unchanged
    # GPUs the runtime adapter reports (Triton's metric labels) win over discovered ones.
    store.apply_model_delta(
        assigner.assign(ModelStateDelta(KEY, 4, {"labels": Labels(gpu_uuid="GPU-9")}))
    )
    store.apply_model_delta(assigner.assign(ModelStateDelta(KEY, 5, {"running": 3.0})))
    state = store.get_model(KEY)
    assert state is not None
    assert state.labels.gpu_uuid == "GPU-9"


def test_configured_gpus_win_over_discovered_ones() -> None:
    store = StateStore()
    assigner = GpuAssigner("GPU-1", store.get_model, discovered="GPU-3")
    store.apply_model_delta(assigner.assign(ModelStateDelta(KEY, 1, {"running": 1.0})))
    state = store.get_model(KEY)
    assert state is not None
    assert state.labels.gpu_uuid == "GPU-1"

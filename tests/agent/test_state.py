"""The fused store: versioned deltas, per-model candidate lists, GPUs and watchers."""

from __future__ import annotations

from infermesh.core.model import (
    GpuKey,
    GpuStateDelta,
    Labels,
    ModelStateDelta,
    TargetKey,
)
from infermesh.core.scoring.state import StateStore

A = TargetKey(model="llama", node="n1", endpoint="http://a:8000")
B = TargetKey(model="llama", node="n2", endpoint="http://b:8000")


def test_a_stale_delta_is_a_no_op() -> None:
    store = StateStore()
    assert store.apply_model_delta(ModelStateDelta(A, 2, {"running": 4.0}))
    assert not store.apply_model_delta(ModelStateDelta(A, 2, {"running": 9.0}))
    assert not store.apply_model_delta(ModelStateDelta(A, 1, {"running": 9.0}))
    state = store.get_model(A)
    assert state is not None
    assert state.running == 4.0
    assert state.version == 2
    assert (store.model_counts.applied, store.model_counts.stale) == (1, 2)


def test_candidates_are_kept_per_model_and_updated_in_place() -> None:
    store = StateStore()
    store.apply_model_delta(ModelStateDelta(B, 1, {"running": 1.0}))
    store.apply_model_delta(ModelStateDelta(A, 1, {"running": 2.0}))
    before = store.candidates("llama")
    assert [s.key for s in before] == [A, B]
    store.apply_model_delta(ModelStateDelta(A, 2, {"running": 7.0}))
    after = store.candidates("llama")
    assert [s.running for s in after] == [7.0, 1.0]
    # a reader holding the earlier tuple still sees the earlier values: snapshots are immutable
    assert [s.running for s in before] == [2.0, 1.0]
    assert store.candidates("mistral") == ()


def test_lora_adapters_make_a_target_a_candidate_for_them() -> None:
    store = StateStore()
    store.apply_model_delta(ModelStateDelta(A, 1, {"adapters": ("sql-lora",)}))
    assert [s.key for s in store.candidates("sql-lora")] == [A]
    store.apply_model_delta(ModelStateDelta(A, 2, {"adapters": ()}))
    assert store.candidates("sql-lora") == ()
    assert store.model_known("sql-lora"), "a model that was ever served stays known"
    assert not store.model_known("never-served")


def test_targets_are_found_by_target_id() -> None:
    store = StateStore()
    store.apply_model_delta(ModelStateDelta(A, 1, {"running": 1.0}))
    state = store.get_target(A.target_id)
    assert state is not None
    assert state.key == A


def test_gpus_are_attached_by_uuid_label_or_node() -> None:
    store = StateStore()
    for uuid, index in (("GPU-0", 0), ("GPU-1", 1)):
        store.apply_gpu_delta(GpuStateDelta(GpuKey("n1", uuid), 1, {"index": index}))
    store.apply_gpu_delta(GpuStateDelta(GpuKey("n2", "GPU-9"), 1, {}))
    store.apply_model_delta(ModelStateDelta(A, 1, {}))
    state = store.get_model(A)
    assert state is not None
    assert [g.key.gpu_uuid for g in store.gpus_for(state)] == ["GPU-0", "GPU-1"]
    store.apply_model_delta(ModelStateDelta(A, 2, {"labels": Labels(gpu_uuid="GPU-1")}))
    state = store.get_model(A)
    assert state is not None
    assert [g.key.gpu_uuid for g in store.gpus_for(state)] == ["GPU-1"]
    assert not store.apply_gpu_delta(GpuStateDelta(GpuKey("n1", "GPU-0"), 1, {"index": 5}))


def test_watchers_see_applied_deltas_only_until_they_unsubscribe() -> None:
    store = StateStore()
    seen: list[ModelStateDelta] = []
    subscription = store.subscribe_models(seen.append)
    first = ModelStateDelta(A, 1, {"running": 1.0})
    store.apply_model_delta(first)
    store.apply_model_delta(ModelStateDelta(A, 1, {"running": 5.0}))  # stale: not delivered
    subscription.close()
    store.apply_model_delta(ModelStateDelta(A, 2, {"running": 2.0}))
    assert seen == [first]

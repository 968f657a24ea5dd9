"""Model <-> protobuf conversions are lossless and reject malformed wire input clearly."""

from __future__ import annotations

import pytest

from infermesh.core.convert import (
    gpu_delta_from_pb,
    gpu_delta_to_pb,
    gpu_snapshot_delta_pb,
    gpu_state_from_pb,
    gpu_state_to_pb,
    model_delta_from_pb,
    model_delta_to_pb,
    model_snapshot_delta_pb,
    model_state_from_pb,
    model_state_to_pb,
    request_features_from_pb,
    request_features_to_pb,
    slo_class_from_pb,
    target_key_from_pb,
)
from infermesh.core.model import (
    GpuKey,
    GpuState,
    GpuStateDelta,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    SloClass,
    TargetKey,
)
from infermesh.core.proto import scoring_pb2, types_pb2

KEY = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8001")
GPU = GpuKey(node="n1", gpu_uuid="GPU-1")


def full_state() -> ModelState:
    return ModelState(
        key=KEY,
        labels=Labels(model="llama", runtime="vllm", node="n1", custom={"rack": "r7"}),
        running=3,
        waiting=2,
        kv_cache_usage=0.4,
        prefix_cache_hit_rate=0.25,
        ttft_s=0.12,
        itl_s=0.02,
        e2e_s=3.5,
        prompt_tokens_per_s=900.0,
        generation_tokens_per_s=120.0,
        max_num_seqs=256,
        loaded=True,
        warming=False,
        healthy=False,
        health_reason="scrape failed",
        adapters=("sql-lora",),
        last_updated=1_700_000_000.5,
        version=42,
    )


def test_model_state_round_trips_every_field() -> None:
    state = full_state()
    message = model_state_to_pb(state)
    assert message.work_left_s == pytest.approx(state.work_left_s)
    assert model_state_from_pb(message) == state


def test_model_state_none_fields_stay_none() -> None:
    state = ModelState(key=KEY, version=1)
    assert model_state_from_pb(model_state_to_pb(state)) == state


def test_model_delta_carries_only_changed_fields_including_a_reset_to_none() -> None:
    delta = ModelStateDelta(key=KEY, version=7, changes={"waiting": 5.0, "ttft_s": None})
    message = model_delta_to_pb(delta)
    assert sorted(message.changed) == ["ttft_s", "waiting"]
    assert model_delta_from_pb(message) == delta


def test_model_snapshot_delta_rebuilds_the_full_state() -> None:
    state = full_state()
    rebuilt = ModelState.from_delta(model_delta_from_pb(model_snapshot_delta_pb(state)))
    assert rebuilt == state


def test_model_delta_with_unknown_field_name_is_rejected_by_name() -> None:
    message = model_delta_to_pb(ModelStateDelta(key=KEY, version=1, changes={"running": 1.0}))
    message.changed.append("runing")
    with pytest.raises(ValueError, match=r"unknown field.*'runing'"):
        model_delta_from_pb(message)


def test_incomplete_target_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="incomplete TargetKey"):
        target_key_from_pb(types_pb2.TargetKey(model="m", node="n1"))


def test_gpu_state_round_trips_with_derived_health() -> None:
    state = GpuState(
        key=GPU,
        labels=Labels(node="n1"),
        index=1,
        name="NVIDIA H100",
        utilization=0.7,
        memory_used_bytes=40 << 30,
        memory_total_bytes=80 << 30,
        temperature_c=61.0,
        power_w=400.0,
        power_limit_w=700.0,
        clock_event_reasons=frozenset({"hw_slowdown", "sw_power_cap"}),
        ecc_dbe_volatile=0,
        xid_last=79,
        last_updated=10.0,
        version=3,
    )
    message = gpu_state_to_pb(state)
    assert message.vram_headroom == pytest.approx(0.5)
    assert not message.healthy
    assert message.health_reason == "XID 79 reported"
    assert gpu_state_from_pb(message) == state


def test_gpu_delta_and_snapshot_round_trip() -> None:
    delta = GpuStateDelta(key=GPU, version=2, changes={"temperature_c": 80.0})
    assert gpu_delta_from_pb(gpu_delta_to_pb(delta)) == delta
    state = GpuState(key=GPU, utilization=0.3, version=9)
    assert GpuState.from_delta(gpu_delta_from_pb(gpu_snapshot_delta_pb(state))) == state


def test_request_features_round_trip() -> None:
    request = RequestFeatures(
        model="llama",
        slo_class=SloClass.LATENCY,
        prompt_tokens=100,
        max_output_tokens=50,
        prefix_key=(1 << 64) - 1,
        tenant="acme",
        stream=True,
        filters={"zone": "a"},
        request_id="r1",
    )
    assert request_features_from_pb(request_features_to_pb(request)) == request


def test_unspecified_slo_class_means_standard_and_unknown_is_an_error() -> None:
    assert slo_class_from_pb(types_pb2.SLO_CLASS_UNSPECIFIED) is SloClass.STANDARD
    with pytest.raises(ValueError, match="unknown SloClass enum value 9"):
        slo_class_from_pb(9)


def test_request_without_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="model is empty"):
        request_features_from_pb(scoring_pb2.RequestFeatures())

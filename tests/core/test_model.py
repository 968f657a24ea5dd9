"""The data model: derived values, versioned deltas, health, parsing of ids and headers."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from infermesh.core.contracts import TargetView
from infermesh.core.model import (
    DEFAULT_REQUEST_SERVICE_S,
    GpuKey,
    GpuState,
    GpuStateDelta,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    SloClass,
    TargetKey,
    finite_or_none,
)

KEY = TargetKey(model="llama", node="node-a", endpoint="http://10.0.0.7:8000")
GPU = GpuKey(node="node-a", gpu_uuid="GPU-1")
GIB = 1024**3


def state(**changes: Any) -> ModelState:
    return attrs.evolve(ModelState(key=KEY), **changes)


# --------------------------------------------------------------------------- work_left_s


def test_idle_target_has_no_work_left() -> None:
    assert state(e2e_s=2.0).work_left_s == 0.0


def test_queued_requests_each_need_a_full_service_time_at_single_parallelism() -> None:
    assert state(waiting=3, running=0, e2e_s=2.0).work_left_s == pytest.approx(6.0)


def test_running_requests_count_half_and_share_the_engine() -> None:
    # 4 running (half done) + 4 waiting = 6 request-times of 2 s, processed 4 at a time.
    assert state(running=4, waiting=4, e2e_s=2.0).work_left_s == pytest.approx(3.0)


def test_work_left_uses_a_default_service_time_before_latency_is_known() -> None:
    assert state(waiting=2, e2e_s=None).work_left_s == pytest.approx(2 * DEFAULT_REQUEST_SERVICE_S)
    assert state(waiting=2, e2e_s=0.0).work_left_s == pytest.approx(2 * DEFAULT_REQUEST_SERVICE_S)


def test_in_flight_requests_the_scrape_missed_count_as_queued() -> None:
    busy = state(running=2, waiting=1, e2e_s=4.0)
    view = TargetView(state=busy, in_flight=2)
    # (1 waiting + 2 unseen + 0.5 * 2 running) * 4 s / 2 in parallel
    assert view.expected_work_left_s == pytest.approx(8.0)
    assert TargetView(state=busy).expected_work_left_s == pytest.approx(busy.work_left_s)


def test_in_flight_on_an_idle_target_costs_one_service_time_each() -> None:
    view = TargetView(state=state(e2e_s=1.5), in_flight=2)
    assert view.expected_work_left_s == pytest.approx(3.0)


def test_freshness_compares_last_update_with_now() -> None:
    s = state(last_updated=100.0)
    assert s.is_fresh(now=104.0, stale_after_s=5.0)
    assert not s.is_fresh(now=106.0, stale_after_s=5.0)


# --------------------------------------------------------------------------- vram_headroom


def test_vram_headroom_is_the_free_fraction_of_device_memory() -> None:
    gpu = GpuState(key=GPU, memory_used_bytes=60 * GIB, memory_total_bytes=80 * GIB)
    assert gpu.vram_headroom == pytest.approx(0.25)


def test_vram_headroom_is_zero_when_total_is_unknown() -> None:
    assert GpuState(key=GPU, memory_used_bytes=GIB).vram_headroom == 0.0


def test_vram_headroom_is_clamped_to_zero_and_one() -> None:
    over = GpuState(key=GPU, memory_used_bytes=90 * GIB, memory_total_bytes=80 * GIB)
    negative = GpuState(key=GPU, memory_used_bytes=-GIB, memory_total_bytes=80 * GIB)
    assert over.vram_headroom == 0.0
    assert negative.vram_headroom == 1.0


# --------------------------------------------------------------------------- deltas


def test_delta_carries_only_changed_fields_and_round_trips() -> None:
    old = state(running=1, waiting=0, version=3)
    new = attrs.evolve(old, running=5, kv_cache_usage=0.5, version=4)
    delta = old.delta_to(new)
    assert dict(delta.changes) == {"running": 5, "kv_cache_usage": 0.5}
    assert delta.version == 4
    assert old.apply(delta) == new


def test_gpu_delta_round_trips() -> None:
    old = GpuState(key=GPU, utilization=0.1, version=1)
    new = attrs.evolve(
        old, utilization=0.9, clock_event_reasons=frozenset({"hw_slowdown"}), version=2
    )
    assert old.apply(old.delta_to(new)) == new


def test_stale_delta_is_a_no_op() -> None:
    current = state(running=7, version=10)
    stale = ModelStateDelta(key=KEY, version=9, changes={"running": 1})
    same_version = ModelStateDelta(key=KEY, version=10, changes={"running": 1})
    assert current.apply(stale) is current
    assert current.apply(same_version) is current


def test_stale_gpu_delta_is_a_no_op() -> None:
    current = GpuState(key=GPU, utilization=0.5, version=5)
    assert current.apply(GpuStateDelta(key=GPU, version=4, changes={"utilization": 0.1})) is current


def test_first_delta_builds_a_state_even_at_version_zero() -> None:
    built = ModelState.from_delta(ModelStateDelta(key=KEY, version=0, changes={"waiting": 3}))
    assert built.waiting == 3
    gpu = GpuState.from_delta(GpuStateDelta(key=GPU, version=0, changes={"temperature_c": 71.0}))
    assert gpu.temperature_c == 71.0


def test_unknown_field_in_delta_is_rejected_with_the_known_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown ModelState field\(s\) in delta: \['runing'\]"):
        ModelStateDelta(key=KEY, version=1, changes={"runing": 1})
    with pytest.raises(ValueError, match="unknown GpuState field"):
        GpuStateDelta(key=GPU, version=1, changes={"temp": 1})


def test_delta_cannot_change_identity_fields() -> None:
    with pytest.raises(ValueError, match="cannot change"):
        ModelStateDelta(key=KEY, version=1, changes={"version": 2})


def test_delta_for_another_target_is_refused() -> None:
    other = TargetKey(model="llama", node="node-b", endpoint="http://10.0.0.8:8000")
    with pytest.raises(ValueError, match="node-b"):
        state(version=1).apply(ModelStateDelta(key=other, version=2, changes={}))
    with pytest.raises(ValueError, match="delta from"):
        state().delta_to(ModelState(key=other, version=1))


def test_delta_of_a_change_without_a_newer_version_is_refused() -> None:
    old = state(running=1, version=4)
    with pytest.raises(ValueError, match="newer version"):
        old.delta_to(attrs.evolve(old, running=2))
    assert dict(old.delta_to(old).changes) == {}


def test_deltas_are_hashable_and_compare_by_value() -> None:
    a = ModelStateDelta(key=KEY, version=1, changes={"running": 2.0})
    b = ModelStateDelta(key=KEY, version=1, changes={"running": 2.0})
    assert a == b
    assert hash(a) == hash(b)


# --------------------------------------------------------------------------- GPU health


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, "ok"),
        ({"ecc_dbe_volatile": 2}, "2 uncorrectable (double-bit) ECC errors"),
        ({"remapped_rows_failure": True}, "row remapping failed"),
        ({"remapped_rows_pending": True}, "row remapping pending (GPU reset required)"),
        ({"xid_last": 79}, "XID 79 reported"),
    ],
)
def test_gpu_health_names_the_problem(changes: dict[str, Any], reason: str) -> None:
    gpu = attrs.evolve(GpuState(key=GPU), **changes)
    assert gpu.health == (reason == "ok", reason)
    assert gpu.healthy is (reason == "ok")


def test_application_xids_and_benign_clock_events_leave_a_gpu_healthy() -> None:
    app_fault = GpuState(key=GPU, xid_last=31)
    idle_clocks = GpuState(key=GPU, clock_event_reasons=frozenset({"gpu_idle", "sw_power_cap"}))
    assert app_fault.health == (True, "ok")
    assert idle_clocks.health == (True, "ok")


def test_throttling_is_not_a_fault_but_is_named() -> None:
    events = frozenset({"hw_thermal_slowdown", "hw_slowdown", "gpu_idle"})
    gpu = GpuState(key=GPU, clock_event_reasons=events)
    assert gpu.health == (True, "ok")
    assert gpu.throttle_reasons == ("hw_slowdown", "hw_thermal_slowdown")


def test_first_gpu_problem_wins() -> None:
    gpu = GpuState(key=GPU, ecc_dbe_volatile=1, xid_last=48)
    assert gpu.health == (False, "1 uncorrectable (double-bit) ECC errors")


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("header", "slo"),
    [
        (None, SloClass.STANDARD),
        ("", SloClass.STANDARD),
        ("  ", SloClass.STANDARD),
        ("latency", SloClass.LATENCY),
        (" Batch ", SloClass.BATCH),
    ],
)
def test_slo_class_parses_header_values(header: str | None, slo: SloClass) -> None:
    assert SloClass.parse(header) is slo


def test_unknown_slo_class_names_the_value_and_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown SLO class 'urgent'; expected one of: latency"):
        SloClass.parse("urgent")


def test_slo_classes_order_admission_and_hedging() -> None:
    assert SloClass.LATENCY.priority < SloClass.STANDARD.priority < SloClass.BATCH.priority
    assert [c.hedgeable for c in SloClass] == [True, False, False]
    assert SloClass.BATCH.shed_at_load < SloClass.LATENCY.shed_at_load


def test_target_id_round_trips() -> None:
    assert TargetKey.parse(KEY.target_id) == KEY
    assert KEY.target_id == "node-a|http://10.0.0.7:8000|llama"


@pytest.mark.parametrize("bad", ["", "node|http://x", "a|b|c|d", "node||llama", "|http://x|m"])
def test_malformed_target_id_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match=r"malformed target id .*expected 'node\|endpoint\|model'"):
        TargetKey.parse(bad)


# --------------------------------------------------------------------------- labels and features


def test_labels_match_standard_and_custom_labels() -> None:
    labels = Labels(model="llama", zone="eu-1", custom={"pool": "gold"})
    assert labels.matches({})
    assert labels.matches({"zone": "eu-1", "pool": "gold"})
    assert not labels.matches({"zone": "us-1"})
    assert not labels.matches({"pool": "silver"})
    assert not labels.matches({"missing": ""})


def test_custom_labels_are_frozen_in_sorted_order() -> None:
    a = Labels(custom={"b": "2", "a": "1"})
    b = Labels(custom=(("a", "1"), ("b", "2")))
    assert a == b
    assert hash(a) == hash(b)
    assert a.get("a") == "1"


def test_request_filters_accept_a_mapping() -> None:
    features = RequestFeatures(model="llama", filters={"zone": "eu-1"})
    assert features.filters == (("zone", "eu-1"),)
    assert features.slo_class is SloClass.STANDARD


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (float("nan"), None), (float("inf"), None), (-float("inf"), None), (1.5, 1.5)],
)
def test_finite_or_none_drops_values_a_score_cannot_use(
    value: float | None, expected: float | None
) -> None:
    assert finite_or_none(value) == expected


def test_target_id_is_formatted_once_and_is_not_part_of_the_key() -> None:
    key = TargetKey(model="m", node="n1", endpoint="http://10.0.0.1:8000")
    first = key.target_id
    assert first == "n1|http://10.0.0.1:8000|m"
    assert key.target_id is first  # kept on the key: scorers read it without reformatting
    assert TargetKey.parse(first) == key
    assert attrs.asdict(key) == {"model": "m", "node": "n1", "endpoint": "http://10.0.0.1:8000"}
    other = TargetKey(model="m", node="n1", endpoint="http://10.0.0.1:8000")
    assert other == key  # read or not, keys compare and hash by value
    assert hash(other) == hash(key)
    assert attrs.evolve(key, node="n2").target_id == "n2|http://10.0.0.1:8000|m"
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        key.node = "n3"  # type: ignore[misc]

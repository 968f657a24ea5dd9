"""Fleet saturation from replicas' queues and KV pressure; batch is shed first, latency last."""

from __future__ import annotations

import pytest

from infermesh.core.model import ModelState, SloClass, TargetKey
from infermesh.router.saturation import (
    SaturationThresholds,
    fleet_saturation,
    replica_load,
    sheds,
)

THRESHOLDS = SaturationThresholds(waiting=8.0, kv_cache_usage=0.95)


def replica(
    index: int,
    waiting: float = 0.0,
    kv: float = 0.0,
    *,
    loaded: bool = True,
    healthy: bool = True,
    warming: bool = False,
) -> ModelState:
    key = TargetKey(model="m", node="n", endpoint=f"http://r{index}")
    return ModelState(
        key,
        waiting=waiting,
        kv_cache_usage=kv,
        loaded=loaded,
        healthy=healthy,
        warming=warming,
    )


def shed_classes(saturation: float | None) -> list[SloClass]:
    return [slo for slo in SloClass if sheds(saturation, slo.shed_at_load)]


def test_a_replica_is_as_loaded_as_its_queue_or_its_kv_cache_whichever_is_fuller() -> None:
    assert replica_load(replica(0, waiting=4), THRESHOLDS) == pytest.approx(0.5)
    assert replica_load(replica(0, waiting=1, kv=0.95), THRESHOLDS) == pytest.approx(1.0)
    assert replica_load(replica(0, waiting=80), THRESHOLDS) == 1.0


def test_as_queues_grow_batch_is_shed_first_then_standard_and_latency_never() -> None:
    seen: list[list[SloClass]] = []
    for waiting in (0, 4, 7, 7.9, 8, 100):
        fleet = [replica(i, waiting=waiting) for i in range(3)]
        seen.append(shed_classes(fleet_saturation(fleet, THRESHOLDS)))
    assert seen == [
        [],
        [],
        [SloClass.BATCH],
        [SloClass.STANDARD, SloClass.BATCH],
        [SloClass.STANDARD, SloClass.BATCH],
        [SloClass.STANDARD, SloClass.BATCH],
    ]


def test_a_policy_threshold_can_shed_latency_at_full_saturation() -> None:
    full = fleet_saturation([replica(0, waiting=8)], THRESHOLDS)
    assert not sheds(full, 1.0)
    assert sheds(full, 0.99)


def test_only_replicas_that_can_take_requests_count() -> None:
    fleet = [
        replica(0, waiting=8),
        replica(1, loaded=False),
        replica(2, healthy=False),
        replica(3, warming=True),
    ]
    assert fleet_saturation(fleet, THRESHOLDS) == 1.0
    assert fleet_saturation(fleet[1:], THRESHOLDS) is None
    assert shed_classes(None) == []


def test_thresholds_must_be_usable() -> None:
    with pytest.raises(ValueError, match="saturation_waiting must be > 0"):
        SaturationThresholds(waiting=0)
    with pytest.raises(ValueError, match="saturation_kv_cache_usage must be in"):
        SaturationThresholds(kv_cache_usage=1.5)

"""GPU health in scoring: faulty GPUs exclude their replicas with the reason, throttled, hot or
memory-starved ones get a lower `gpu_health` score, and a replica is as healthy as its worst GPU."""

from __future__ import annotations

from typing import Any

import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import TargetView
from infermesh.core.model import (
    GpuKey,
    GpuState,
    GpuStateDelta,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.scoring.engine import Ranking, ScoringEngine
from infermesh.core.scoring.gpu_health import GpuHealthScorer, gpu_exclusion_reason, gpu_score
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 1_000_000.0
NODE = "n1"
GIB = 1 << 30


def gpu(uuid: str = "GPU-0", **fields: Any) -> GpuState:
    fields.setdefault("last_updated", NOW - 0.5)
    return GpuState(key=GpuKey(NODE, uuid), **fields)


def score(*gpus: GpuState) -> tuple[float, str]:
    view = TargetView(state=ModelState(key=TargetKey("m", NODE, "http://a")), gpus=gpus, now=NOW)
    result = GpuHealthScorer().score_one(RequestFeatures(model="m"), view)
    return result.score, result.reason


# --------------------------------------------------------------------------- the scorer


def test_a_cool_unthrottled_gpu_with_memory_to_spare_scores_1() -> None:
    roomy = gpu(temperature_c=60.0, memory_used_bytes=10 * GIB, memory_total_bytes=80 * GIB)
    assert score(roomy) == (1.0, "GPU GPU-0 ok")
    assert score() == (1.0, "no GPU telemetry")


@pytest.mark.parametrize(
    ("fields", "expected", "reason"),
    [
        (
            {"clock_event_reasons": frozenset({"hw_thermal_slowdown", "gpu_idle"})},
            0.4,
            "GPU GPU-0 throttled hw_thermal_slowdown x0.4",
        ),
        (
            {"clock_event_reasons": frozenset({"sw_power_cap"})},
            0.85,
            "GPU GPU-0 throttled sw_power_cap x0.85",
        ),
        ({"temperature_c": 85.0}, 0.8, "GPU GPU-0 85C > 80C x0.80"),
        ({"temperature_c": 97.0}, 0.6, "GPU GPU-0 97C > 80C x0.60"),
        (
            {"memory_used_bytes": 76 * GIB, "memory_total_bytes": 80 * GIB},
            0.75,
            "GPU GPU-0 VRAM 5% free < 10% x0.75",
        ),
    ],
)
def test_each_degradation_lowers_the_score_and_is_named(
    fields: dict[str, Any], expected: float, reason: str
) -> None:
    got, why = score(gpu(**fields))
    assert got == pytest.approx(expected)
    assert why == reason


def test_degradations_multiply() -> None:
    got, why = score(
        gpu(temperature_c=90.0, clock_event_reasons=frozenset({"sw_thermal_slowdown"}))
    )
    assert got == pytest.approx(0.6 * 0.6)
    assert why == "GPU GPU-0 throttled sw_thermal_slowdown x0.6, 90C > 80C x0.60"


def test_a_replica_on_several_gpus_scores_as_its_worst() -> None:
    cool = gpu("GPU-0")
    hot = gpu("GPU-1", temperature_c=95.0)
    got, why = score(cool, hot)
    assert got == pytest.approx(0.6)
    assert why == "GPU GPU-1 95C > 80C x0.60 (worst of 2 GPUs)"


def test_stale_gpu_telemetry_is_not_used_for_degradations() -> None:
    old = gpu(temperature_c=99.0, last_updated=NOW - 12.0)
    assert score(old) == (1.0, "GPU GPU-0 telemetry 12.0s old (stale after 5s): not used")
    # The limit is [scoring] stale_after_s.
    scorer = GpuHealthScorer().configured(ScoringConfig(stale_after_s=20.0))
    view = TargetView(state=ModelState(key=TargetKey("m", NODE, "http://a")), gpus=(old,), now=NOW)
    assert scorer.score_one(RequestFeatures(model="m"), view).score == pytest.approx(0.6)


def test_gpu_score_thresholds_are_tunable() -> None:
    assert gpu_score(gpu(temperature_c=85.0), NOW, warm_c=70.0, hot_c=85.0)[0] == pytest.approx(0.6)


# --------------------------------------------------------------------------- the filter


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"xid_last": 79}, "GPU GPU-1 unhealthy: XID 79 reported"),
        ({"ecc_dbe_volatile": 3}, "GPU GPU-1 unhealthy: 3 uncorrectable (double-bit) ECC errors"),
        ({"remapped_rows_failure": True}, "GPU GPU-1 unhealthy: row remapping failed"),
    ],
)
def test_a_fault_on_any_gpu_of_a_replica_excludes_it(fields: dict[str, Any], reason: str) -> None:
    assert gpu_exclusion_reason([gpu("GPU-0"), gpu("GPU-1", **fields)]) == reason
    assert gpu_exclusion_reason([gpu("GPU-0", xid_last=31)]) is None  # an application's fault


class Fleet:
    """Two replicas of model m on node n1, each on its own GPU, scored by the built-ins."""

    def __init__(self, labels: bool = True) -> None:
        self.store = StateStore()
        self.engine = ScoringEngine.from_config(
            self.store,
            InflightTracker(id_prefix="t"),
            {s.name: s for s in builtin_scorers()},
            ScoringConfig(),
        )
        self.version = 0
        for name, uuid in (("a", "GPU-A"), ("b", "GPU-B")):
            self.set_gpu(uuid, temperature_c=50.0)
            key = TargetKey("m", NODE, f"http://{name}")
            changes = {
                "labels": Labels(gpu_uuid=uuid if labels else ""),
                "last_updated": NOW - 0.5,
                "running": 1.0,
            }
            self.store.apply_model_delta(ModelStateDelta(key, 1, changes))

    def set_gpu(self, uuid: str, **changes: Any) -> None:
        self.version += 1
        changes.setdefault("last_updated", NOW - 0.5)
        self.store.apply_gpu_delta(GpuStateDelta(GpuKey(NODE, uuid), self.version, changes))

    def rank(self) -> Ranking:
        return self.engine.rank(RequestFeatures(model="m"), NOW)


def ids(ranking: Ranking) -> list[str]:
    return [t.target_id.split("|")[1] for t in ranking.targets]


def test_an_xid_removes_the_replica_with_the_reason_and_recovery_brings_it_back() -> None:
    fleet = Fleet()
    fleet.set_gpu("GPU-B", xid_last=79)
    ranking = fleet.rank()
    assert ids(ranking) == ["http://a"]
    assert [str(e) for e in ranking.excluded] == [
        "n1|http://b|m: GPU GPU-B unhealthy: XID 79 reported"
    ]
    fleet.set_gpu("GPU-B", xid_last=0)
    assert sorted(ids(fleet.rank())) == ["http://a", "http://b"]


def test_a_throttled_gpu_ranks_its_replica_last_with_the_reason() -> None:
    fleet = Fleet()
    fleet.set_gpu("GPU-A", clock_event_reasons=frozenset({"hw_slowdown"}))
    ranking = fleet.rank()
    assert ids(ranking) == ["http://b", "http://a"]
    reasons = {r.scorer: r for r in ranking.targets[1].reasons}
    assert reasons["gpu_health"].score == pytest.approx(0.4)
    assert reasons["gpu_health"].reason == "GPU GPU-A throttled hw_slowdown x0.4"
    assert reasons["gpu_health"].weight == 2.0


def test_without_a_gpu_mapping_a_node_fault_does_not_exclude_every_replica() -> None:
    # Unmapped replicas count every GPU of the node for scoring, but one faulty GPU must not
    # take them all out: the fault cannot be pinned on either.
    fleet = Fleet(labels=False)
    fleet.set_gpu("GPU-B", xid_last=79)
    assert sorted(ids(fleet.rank())) == ["http://a", "http://b"]


def test_a_fault_holds_while_the_gpu_telemetry_is_stale_but_degradations_do_not() -> None:
    fleet = Fleet()
    fleet.set_gpu("GPU-B", xid_last=48, last_updated=NOW - 60.0)
    fleet.set_gpu("GPU-A", temperature_c=99.0, last_updated=NOW - 60.0)
    ranking = fleet.rank()
    assert ids(ranking) == ["http://a"]
    assert "GPU GPU-B unhealthy: XID 48 reported" in str(ranking.excluded[0])
    (reason,) = [r for r in ranking.targets[0].reasons if r.scorer == "gpu_health"]
    assert (reason.score, reason.reason) == (
        1.0,
        "GPU GPU-A telemetry 60.0s old (stale after 5s): not used",
    )

"""`infermesh sim route`: InferMesh behind the live admission and hedging, with GPU telemetry."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from infermesh.core.config import (
    AdmissionConfig,
    BatchAdmissionConfig,
    HedgingConfig,
    LatencyAdmissionConfig,
    SloAdmissionConfig,
)
from infermesh.core.scoring.gpu_health import gpu_score
from infermesh.dev.sim.cli import sim_group
from infermesh.dev.sim.route.infermesh_strategy import MODEL, InferMeshStrategy
from infermesh.dev.sim.route.metrics import compute_metrics
from infermesh.dev.sim.route.router_tier import RouterSpec
from infermesh.dev.sim.route.runner import RouteSimSettings, run_seeds
from infermesh.dev.sim.route.strategy import SimRequest
from infermesh.dev.sim.route.world import FleetSpec, World

SLO_CLASSES = ("latency", "standard", "batch")


def mixed_classes(seed: int, rate: float, duration_s: float) -> Iterator[SimRequest]:
    """Poisson arrivals of all three SLO classes, some sharing a prefix."""
    rng = random.Random(seed)
    now, index = 0.0, 0
    while True:
        now += rng.expovariate(rate)
        if now >= duration_s:
            return
        prefix = rng.choice([0, 512])
        yield SimRequest(
            request_id=f"m{index}",
            arrival_s=now,
            prompt_tokens=prefix + rng.randint(32, 512),
            output_tokens=rng.randint(16, 128),
            prefix_group=f"g{rng.randrange(3)}" if prefix else "",
            prefix_tokens=prefix,
            slo_class=SLO_CLASSES[index % 3],
        )
        index += 1


def tight_admission() -> AdmissionConfig:
    """Few slots and short queues, so a small overloaded fleet queues, refuses and times out."""
    return AdmissionConfig(
        max_concurrent_per_model=24,
        latency=LatencyAdmissionConfig(max_queue=8, max_queue_wait_s=0.5),
        standard=SloAdmissionConfig(max_queue=8, max_queue_wait_s=1.0),
        batch=BatchAdmissionConfig(max_concurrent=8, max_queue=8, max_queue_wait_s=2.0),
    )


def eager_hedging() -> HedgingConfig:
    """Hedge every request still without a first token after 50 ms, budget permitting."""
    return HedgingConfig(default_delay_s=0.05, min_samples=10_000, budget_ratio=0.5)


def test_conservation_holds_with_admission_queues_refusals_and_hedges() -> None:
    spec = RouterSpec(routers=2, admission_config=tight_admission(), hedging_config=eager_hedging())
    strategy = InferMeshStrategy()
    world = World(FleetSpec(replicas=4, degraded=1, profiles=("a10",)), strategy, 7, spec)
    requests = list(mixed_classes(7, rate=40, duration_s=6))
    result = world.run(requests, 6.0, drain_s=2.0)
    metrics = compute_metrics("infermesh", result)

    assert metrics.arrived == len(requests)
    assert metrics.conserved
    assert metrics.rejected > 0
    assert metrics.in_flight > 0
    assert metrics.completed > 0
    assert set(metrics.rejections) <= {"saturated", "queue_full", "queue_timeout"}
    assert sum(metrics.rejections.values()) == metrics.rejected
    assert metrics.hedges > 0
    assert metrics.hedge_extra_load == pytest.approx(metrics.hedges / metrics.arrived)
    # A request is completed, rejected or open, never two of these.
    for record in result.records:
        done = record.finished_s is not None
        assert not (done and record.rejected)
        assert not record.rejected or not record.attempts


def test_a_hedge_is_extra_load_and_its_loser_is_cancelled_on_the_engine() -> None:
    spec = RouterSpec(admission=False, hedging_config=eager_hedging())
    strategy = InferMeshStrategy()
    # One slow replica of two: requests ranked onto it are hedged onto the other.
    fleet = FleetSpec(replicas=2, degraded=1, degraded_speed=0.05, profiles=("a10",))
    world = World(fleet, strategy, 3, spec)
    requests = list(mixed_classes(3, rate=6, duration_s=4))
    result = world.run(requests, 4.0)
    metrics = compute_metrics("infermesh", result)

    hedged = [r for r in result.records if len(r.attempts) > 1]
    assert metrics.hedges == len(hedged) > 0
    assert metrics.completed == metrics.arrived == len(requests)  # each request counted once
    assert metrics.hedge_extra_load == pytest.approx(len(hedged) / len(requests))
    assert all(r.winner in r.attempts for r in hedged)
    # Every loser was aborted on its engine and the router's in-flight counts are back to 0.
    assert all(view.in_flight == 0 for view in world.views)
    assert not any(world._by_id[v.replica_id].engine.has_unfinished() for v in world.views)


def test_the_degraded_gpu_reaches_the_store_and_gpu_health_scores_it_down() -> None:
    strategy = InferMeshStrategy()
    world = World(FleetSpec(replicas=8, degraded=1), strategy, 5, RouterSpec())
    world.run(mixed_classes(5, rate=8, duration_s=3), 3.0)
    store = strategy.store
    (degraded,) = world.degraded
    now = max(gpu.last_updated for gpu in store.gpu_states())
    scores = {}
    for state in store.candidates(MODEL):
        (gpu,) = store.gpus_for(state)  # each replica's own GPU, by its gpu_uuid label
        scores[state.key.endpoint.removeprefix("http://")] = gpu_score(gpu, now)
    assert set(scores) == {view.replica_id for view in world.views}
    score, reason = scores.pop(degraded)
    assert score < 0.5
    assert "sw_thermal_slowdown" in reason
    assert all(s == 1.0 for s, _ in scores.values())


def test_without_gpu_telemetry_the_store_has_no_gpus() -> None:
    strategy = InferMeshStrategy()
    fleet = FleetSpec(replicas=8, degraded=1, gpu_telemetry=False)
    World(fleet, strategy, 5, RouterSpec()).run(mixed_classes(5, rate=8, duration_s=2), 2.0)
    assert strategy.store.gpu_states() == ()


def test_several_seeds_report_the_median_and_keep_each_seed() -> None:
    settings = RouteSimSettings(
        fleet=FleetSpec(replicas=4, degraded=1),
        strategies=("infermesh", "round_robin"),
        workload="short",
        duration_s=3,
        rate=6,
    )
    runs = run_seeds(settings, [1, 2, 3])
    assert list(runs.per_seed) == [1, 2, 3]
    for index, row in enumerate(runs.median):
        rows = [runs.per_seed[seed][index] for seed in (1, 2, 3)]
        p95s = sorted(r.ttft_p95_s for r in rows if r.ttft_p95_s is not None)
        assert row.ttft_p95_s == p95s[1]
        assert row.arrived == sum(r.arrived for r in rows)
        assert row.conserved
    again = run_seeds(settings, [1, 2, 3])
    assert [m.to_json() for m in again.median] == [m.to_json() for m in runs.median]


def test_the_cli_refuses_bad_seeds() -> None:
    result = CliRunner().invoke(sim_group, ["route", "--seeds", "1,x"])
    assert result.exit_code == 2
    assert "--seeds takes comma-separated integers" in result.output


def test_the_cli_writes_the_median_and_every_seed(tmp_path: Path) -> None:
    args = ["route", "--replicas", "4", "--workload", "short", "--duration", "2", "--rate", "4"]
    args += ["--seeds", "1,2", "--strategies", "infermesh,round_robin", "--no-hedging"]
    result = CliRunner().invoke(sim_group, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "median over seeds 1, 2" in result.output
    report = json.loads((tmp_path / "route.json").read_text())
    assert [entry["seed"] for entry in report["seeds"]] == [1, 2]
    per_seed = [entry["strategies"][0]["arrived"] for entry in report["seeds"]]
    assert report["strategies"][0]["arrived"] == sum(per_seed)
    assert report["strategies"][0]["hedges"] == 0

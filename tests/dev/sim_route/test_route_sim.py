"""`infermesh sim route`: the routing simulator over the engine model, as a user runs it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from infermesh.dev.sim.cli import sim_group
from infermesh.dev.sim.route.infermesh_strategy import InferMeshStrategy
from infermesh.dev.sim.route.metrics import compute_metrics
from infermesh.dev.sim.route.report import report_dict
from infermesh.dev.sim.route.runner import RouteSimSettings, run_route_sim
from infermesh.dev.sim.route.strategy import ReplicaView, SimRequest
from infermesh.dev.sim.route.world import FleetSpec, World
from infermesh.dev.sim.workloads import write_trace


class RoundRobin:
    """Enough of a baseline to compare against, independent of the baselines package."""

    name = "test_rr"

    def __init__(self) -> None:
        self._next = 0

    def choose(
        self, request: SimRequest, replicas: Sequence[ReplicaView], now: float
    ) -> str | None:
        view = replicas[self._next % len(replicas)]
        self._next += 1
        return view.replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass


class RejectOdd(RoundRobin):
    name = "reject_odd"

    def choose(
        self, request: SimRequest, replicas: Sequence[ReplicaView], now: float
    ) -> str | None:
        chosen = super().choose(request, replicas, now)
        return None if self._next % 2 else chosen


def poisson(seed: int, rate: float, duration_s: float, groups: int = 4) -> Iterator[SimRequest]:
    """A tiny shared-prefix Poisson workload, independent of the workloads package."""
    rng = random.Random(seed)
    now, index = 0.0, 0
    while True:
        now += rng.expovariate(rate)
        if now >= duration_s:
            return
        prefix = rng.choice([0, 256, 512])
        yield SimRequest(
            request_id=f"p{index}",
            arrival_s=now,
            prompt_tokens=prefix + rng.randint(16, 256),
            output_tokens=rng.randint(8, 64),
            prefix_group=f"g{rng.randrange(groups)}" if prefix else "",
            prefix_tokens=prefix,
        )
        index += 1


def small_fleet(replicas: int = 8, **kwargs: object) -> FleetSpec:
    return FleetSpec(replicas=replicas, degraded=1, **kwargs)  # type: ignore[arg-type]


def test_the_same_seed_gives_an_identical_report() -> None:
    settings = RouteSimSettings(
        fleet=small_fleet(), strategies=("infermesh",), workload="mixed", duration_s=8, rate=8
    )
    first = json.dumps(report_dict(settings, run_route_sim(settings)), sort_keys=True)
    second = json.dumps(report_dict(settings, run_route_sim(settings)), sort_keys=True)
    assert first == second
    assert json.loads(first)["strategies"][0]["arrived"] > 0


def test_every_request_completes_is_rejected_or_is_counted_in_flight() -> None:
    requests = list(poisson(seed=3, rate=40, duration_s=5))
    # No drain: the last arrivals are still running, so some requests are in flight at the end.
    for strategy in (RejectOdd(), InferMeshStrategy()):
        result = World(small_fleet(2), strategy, seed=3).run(requests, 5.0, drain_s=0.0)
        metrics = compute_metrics(strategy.name, result)
        assert metrics.arrived == len(requests)
        assert metrics.conserved
        assert metrics.in_flight > 0
    rejected = compute_metrics("r", World(small_fleet(2), RejectOdd(), 3).run(requests, 5.0))
    assert rejected.rejected == len(requests) // 2
    assert rejected.completed + rejected.rejected == len(requests)


def test_infermesh_steers_work_away_from_a_degraded_replica() -> None:
    fleet = FleetSpec(replicas=2, profiles=("a100",), degraded=1, degraded_speed=0.1)
    requests = list(poisson(seed=5, rate=12, duration_s=20))
    counts: dict[str, dict[str, int]] = {}
    for strategy in (RoundRobin(), InferMeshStrategy()):
        world = World(fleet, strategy, seed=5)
        result = world.run(requests, 20.0)
        per: dict[str, int] = {}
        for record in result.records:
            assert record.replica_id is not None
            per[record.replica_id] = per.get(record.replica_id, 0) + 1
        counts[strategy.name] = {"slow": per.get(world.degraded[0], 0), "all": len(requests)}
    assert counts["infermesh"]["slow"] < 0.3 * counts["infermesh"]["all"]
    assert counts["test_rr"]["slow"] >= 0.45 * counts["test_rr"]["all"]


def test_infermesh_keeps_a_shared_prefix_on_few_replicas() -> None:
    requests = list(poisson(seed=9, rate=10, duration_s=10, groups=2))
    hit_rates = {}
    for strategy in (RoundRobin(), InferMeshStrategy()):
        result = World(FleetSpec(replicas=16, profiles=("h100",)), strategy, 9).run(requests, 10)
        hit_rates[strategy.name] = compute_metrics(strategy.name, result).prefix_hit_rate
    assert hit_rates["infermesh"] > hit_rates["test_rr"]


def test_a_trace_file_replays_through_the_cli(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    requests = list(poisson(seed=11, rate=5, duration_s=4))
    write_trace(trace, requests)
    out = tmp_path / "out"
    args = ["route", "--replicas", "8", "--trace", str(trace), "--strategies", "infermesh"]
    result = CliRunner().invoke(sim_group, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "route.json").read_text())
    (row,) = report["strategies"]
    assert row["arrived"] == len(requests)
    assert row["completed"] == len(requests)
    assert row["conserved"] is True
    assert "TTFT p50 ms" in result.output


def test_the_cli_refuses_an_unknown_strategy() -> None:
    result = CliRunner().invoke(sim_group, ["route", "--strategies", "nope", "--duration", "1"])
    assert result.exit_code != 0
    assert "unknown strategy 'nope'" in result.output


def test_a_thousand_replicas_run_end_to_end_in_cells() -> None:
    fleet = FleetSpec(replicas=1000, degraded=1, kv_blocks_cap=512, scrape_interval_s=2.0)
    settings = RouteSimSettings(
        fleet=fleet,
        strategies=("infermesh", "round_robin"),
        workload="short",
        duration_s=1,
        rate=100,
        cell_size=50,
    )
    for metrics in run_route_sim(settings):
        assert metrics.arrived > 50
        assert metrics.conserved
        assert metrics.completed == metrics.arrived


def test_cells_keep_each_prefix_in_one_cell() -> None:
    strategy = InferMeshStrategy(cell_size=4)
    requests = list(poisson(seed=2, rate=20, duration_s=3, groups=1))
    result = World(FleetSpec(replicas=16, profiles=("h100",)), strategy, 2).run(requests, 3)
    cells = {
        int(r.replica_id[1:]) // 4
        for r in result.records
        if r.replica_id is not None and r.request.prefix_group
    }
    assert len(cells) == 1


def test_parallel_jobs_give_the_same_numbers() -> None:
    settings = RouteSimSettings(
        fleet=small_fleet(), strategies=("infermesh", "round_robin"), duration_s=3, rate=6
    )
    serial = [m.to_json() for m in run_route_sim(settings)]
    parallel = [m.to_json() for m in run_route_sim(settings, jobs=2)]
    assert serial == parallel


def test_the_report_states_the_goals_against_round_robin_and_the_best_peer() -> None:
    settings = RouteSimSettings(
        fleet=small_fleet(),
        strategies=("infermesh", "round_robin", "least_request"),
        workload="chat",
        duration_s=6,
        rate=10,
    )
    metrics = run_route_sim(settings)
    goals = report_dict(settings, metrics)["goals"]
    by_name = {m.strategy: m for m in metrics}
    ours, rr = by_name["infermesh"].ttft_p95_s, by_name["round_robin"].ttft_p95_s
    assert ours is not None
    assert rr is not None
    assert goals["p95_ttft_vs_round_robin"] == round(ours / rr, 4)
    assert goals["best_peer_p95_ttft"] in {"round_robin", "least_request"}


def test_a_strategy_gives_the_same_row_alone_and_last_in_a_list() -> None:
    # `random` draws from its own generator: seeded by its name, not its place in the list
    alone = RouteSimSettings(fleet=small_fleet(), strategies=("random",), duration_s=3, rate=6)
    listed = attrs.evolve(alone, strategies=("round_robin", "power_of_two", "random"))
    assert run_route_sim(alone)[0].to_json() == run_route_sim(listed)[-1].to_json()


@pytest.mark.parametrize("seed", [2, 4])
@pytest.mark.parametrize("profiles", [("h100", "a100", "a10"), ("a10", "a100", "h100")])
def test_before_the_first_scrape_infermesh_puts_long_cold_prompts_on_the_fastest_gpus(
    seed: int, profiles: tuple[str, ...]
) -> None:
    # No replica has served or been scraped yet; their GPUs are known from the start (the DCGM
    # adapter publishes them before traffic), and the GPU-model prior ranks H100 over A100/A10.
    # (Without either, these seeds' nearest node, an A10 or A100 one, got every prompt.)
    fleet = FleetSpec(replicas=24, scrape_interval_s=30.0, profiles=profiles)
    requests = [
        SimRequest(
            request_id=f"long{i}",
            arrival_s=0.001 * (i + 1),
            prompt_tokens=4000,
            output_tokens=16,
            prefix_group=f"doc{i}",
            prefix_tokens=3900,
        )
        for i in range(6)
    ]
    world = World(fleet, InferMeshStrategy(), seed=seed)
    profile_of = {view.replica_id: view.profile for view in world.views}
    result = world.run(requests, 0.01)
    assert [profile_of[r.replica_id or ""] for r in result.records] == ["h100"] * 6

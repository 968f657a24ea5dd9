"""Run several strategies over the same fleet and the same requests; optionally sweep the load.

Every strategy gets a fresh `World` built from the same seed (so the same GPUs, RTTs and
degraded replica) and the same list of requests; nothing reads a clock or global randomness.
A strategy's own random generator is seeded by the run's seed and the strategy's name
(`strategy_seed`), so its numbers do not depend on which other strategies run beside it.
`run_seeds` repeats that for several seeds (each its own requests and fleet draw) and summarises
each strategy by `median_metrics`. InferMesh runs behind routers with the live admission and
hedging (`RouterSpec`); the peers route every request at once, as they do.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from infermesh.dev.sim.route.infermesh_strategy import InferMeshStrategy
from infermesh.dev.sim.route.metrics import StrategyMetrics, compute_metrics, median_metrics
from infermesh.dev.sim.route.router_tier import RouterSpec
from infermesh.dev.sim.route.strategy import SimRequest, Strategy
from infermesh.dev.sim.route.world import FleetSpec, World

__all__ = [
    "RouteSimSettings",
    "SeedRuns",
    "SweepPoint",
    "make_strategy",
    "run_route_sim",
    "run_seeds",
    "run_sweep",
    "strategy_names",
    "strategy_seed",
]

StrategyFactory = Callable[[random.Random], Strategy]


def _factories(cell_size: int | None = None) -> dict[str, StrategyFactory]:
    factories: dict[str, StrategyFactory] = {
        "infermesh": lambda rng: InferMeshStrategy(cell_size=cell_size)
    }
    try:
        from infermesh.dev.sim.route import baselines
    except ImportError:  # the baselines package is optional to this module
        return factories
    registry = getattr(baselines, "BASELINES", None)
    if isinstance(registry, dict):
        for name, factory in registry.items():
            factories[str(name)] = factory
    return factories


def strategy_names() -> list[str]:
    return sorted(_factories())


def strategy_seed(seed: int, name: str) -> int:
    """The seed of strategy `name`'s own generator in a run with `seed`: stable across
    processes and independent of the other strategies in the run."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def make_strategy(name: str, rng: random.Random, cell_size: int | None = None) -> Strategy:
    factories = _factories(cell_size)
    if name not in factories:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(sorted(factories))}")
    return factories[name](rng)


@attrs.frozen
class RouteSimSettings:
    fleet: FleetSpec
    strategies: tuple[str, ...]
    workload: str = "mixed"
    trace: Path | None = None
    duration_s: float = 60.0
    rate: float = 10.0
    seed: int = 1
    drain_s: float = 300.0
    cell_size: int | None = None
    """InferMesh's routing cells (see `InferMeshStrategy`); None: one cell, the whole fleet."""
    admission: bool = True
    """InferMesh's routers run admission (SLO-class slots, queues, saturation shedding)."""
    hedging: bool = True
    """InferMesh's routers hedge before the first token (live defaults)."""
    routers: int | None = None
    """Router processes in front of the fleet; None: one per node of 8 replicas."""

    def __attrs_post_init__(self) -> None:
        if not self.strategies:
            raise ValueError("name at least one strategy")
        known = set(strategy_names())
        for name in self.strategies:
            if name not in known:
                choices = ", ".join(sorted(known))
                raise ValueError(f"unknown strategy {name!r}; choose from {choices}")
        if self.duration_s <= 0 or self.rate <= 0:
            raise ValueError("duration and rate must be positive")
        if self.routers is not None and self.routers < 1:
            raise ValueError("routers must be at least 1")

    @property
    def router_spec(self) -> RouterSpec:
        return RouterSpec(admission=self.admission, hedging=self.hedging, routers=self.routers)


def load_requests(settings: RouteSimSettings) -> list[SimRequest]:
    from infermesh.dev.sim.workloads import generate, read_trace

    if settings.trace is not None:
        return read_trace(settings.trace)
    rng = random.Random(settings.seed)
    return list(generate(settings.workload, rng, settings.duration_s, settings.rate))


def _run_one(
    settings: RouteSimSettings, index: int, requests: Sequence[SimRequest], duration_s: float
) -> StrategyMetrics:
    name = settings.strategies[index]
    rng = random.Random(strategy_seed(settings.seed, name))
    strategy = make_strategy(name, rng, settings.cell_size)
    world = World(settings.fleet, strategy, settings.seed, settings.router_spec)
    result = world.run(requests, duration_s, settings.drain_s)
    return compute_metrics(name, result)


def _duration_s(settings: RouteSimSettings, requests: Sequence[SimRequest]) -> float:
    if settings.trace is not None and requests:
        return max(r.arrival_s for r in requests) + 1e-9
    return settings.duration_s


def run_route_sim(
    settings: RouteSimSettings, requests: Sequence[SimRequest] | None = None, jobs: int = 1
) -> list[StrategyMetrics]:
    """One `StrategyMetrics` per strategy, in the order given; `jobs` > 1 runs the strategies
    in that many processes (the numbers are the same: each run is independent)."""
    if requests is None:
        requests = load_requests(settings)
    duration_s = _duration_s(settings, requests)
    indices = range(len(settings.strategies))
    if jobs <= 1 or len(settings.strategies) == 1:
        return [_run_one(settings, i, requests, duration_s) for i in indices]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(settings.strategies))) as pool:
        futures = [pool.submit(_run_one, settings, i, requests, duration_s) for i in indices]
        return [future.result() for future in futures]


@attrs.frozen
class SeedRuns:
    """Each strategy's runs over several seeds: `median` (one row per strategy, in order, see
    `median_metrics`) and `per_seed` (seed -> one row per strategy)."""

    median: list[StrategyMetrics]
    per_seed: dict[int, list[StrategyMetrics]]


def run_seeds(settings: RouteSimSettings, seeds: Sequence[int], jobs: int = 1) -> SeedRuns:
    """`run_route_sim` once per seed (each seed its own requests, GPUs, RTTs and degraded
    replica; a trace is the same requests every time); `jobs` > 1 runs the (seed, strategy)
    pairs in that many processes, with the same numbers."""
    if not seeds:
        raise ValueError("name at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must differ")
    runs = [attrs.evolve(settings, seed=seed) for seed in seeds]
    loads = [load_requests(run) for run in runs]
    pairs = [(s, i) for s in range(len(runs)) for i in range(len(settings.strategies))]
    if jobs <= 1 or len(pairs) == 1:
        rows = [_run_one(runs[s], i, loads[s], _duration_s(runs[s], loads[s])) for s, i in pairs]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(pairs))) as pool:
            futures = [
                pool.submit(_run_one, runs[s], i, loads[s], _duration_s(runs[s], loads[s]))
                for s, i in pairs
            ]
            rows = [future.result() for future in futures]
    per_seed: dict[int, list[StrategyMetrics]] = {seed: [] for seed in seeds}
    for (s, _), row in zip(pairs, rows, strict=True):
        per_seed[seeds[s]].append(row)
    median = [
        median_metrics([per_seed[seed][i] for seed in seeds])
        for i in range(len(settings.strategies))
    ]
    return SeedRuns(median=median, per_seed=per_seed)


@attrs.frozen
class SweepPoint:
    rate: float
    metrics: tuple[StrategyMetrics, ...]


def run_sweep(
    settings: RouteSimSettings, factors: Sequence[float], jobs: int = 1
) -> list[SweepPoint]:
    """The same run at `rate * factor` for each factor (offered load on the x axis)."""
    return [
        SweepPoint(
            rate=settings.rate * factor,
            metrics=tuple(
                run_route_sim(attrs.evolve(settings, rate=settings.rate * factor), jobs=jobs)
            ),
        )
        for factor in factors
    ]

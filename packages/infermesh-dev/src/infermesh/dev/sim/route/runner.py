"""Run several strategies over the same fleet and the same requests; optionally sweep the load.

Every strategy gets a fresh `World` built from the same seed (so the same GPUs, RTTs and
degraded replica) and the same list of requests; nothing reads a clock or global randomness.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from infermesh.dev.sim.route.infermesh_strategy import InferMeshStrategy
from infermesh.dev.sim.route.metrics import StrategyMetrics, compute_metrics
from infermesh.dev.sim.route.strategy import SimRequest, Strategy
from infermesh.dev.sim.route.world import FleetSpec, World

__all__ = [
    "RouteSimSettings",
    "SweepPoint",
    "make_strategy",
    "run_route_sim",
    "run_sweep",
    "strategy_names",
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
    strategy = make_strategy(name, random.Random(settings.seed * 1_000 + index), settings.cell_size)
    world = World(settings.fleet, strategy, settings.seed)
    result = world.run(requests, duration_s, settings.drain_s)
    return compute_metrics(name, result, hedges=getattr(strategy, "hedges", 0))


def run_route_sim(
    settings: RouteSimSettings, requests: Sequence[SimRequest] | None = None, jobs: int = 1
) -> list[StrategyMetrics]:
    """One `StrategyMetrics` per strategy, in the order given; `jobs` > 1 runs the strategies
    in that many processes (the numbers are the same: each run is independent)."""
    if requests is None:
        requests = load_requests(settings)
    duration_s = settings.duration_s
    if settings.trace is not None and requests:
        duration_s = max(r.arrival_s for r in requests) + 1e-9
    indices = range(len(settings.strategies))
    if jobs <= 1 or len(settings.strategies) == 1:
        return [_run_one(settings, i, requests, duration_s) for i in indices]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=min(jobs, len(settings.strategies))) as pool:
        futures = [pool.submit(_run_one, settings, i, requests, duration_s) for i in indices]
        return [future.result() for future in futures]


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

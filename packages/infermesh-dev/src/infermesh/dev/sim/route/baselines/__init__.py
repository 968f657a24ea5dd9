"""The peers' routing algorithms, written from their published sources, for `infermesh sim route`.

Each baseline implements `infermesh.dev.sim.route.strategy.Strategy` and is built from a seeded
`random.Random`; none reads a clock or global randomness, so a run replays exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from infermesh.dev.sim.route.baselines.cache_aware import ApproximatePrefixTree, CacheAware
from infermesh.dev.sim.route.baselines.llmd import LlmdScorers, PrefixIndex
from infermesh.dev.sim.route.baselines.load_index import LoadIndex
from infermesh.dev.sim.route.baselines.simple import (
    LeastRequest,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
)
from infermesh.dev.sim.route.baselines.telemetry_index import TelemetryIndex
from infermesh.dev.sim.route.strategy import Strategy

__all__ = [
    "BASELINES",
    "ApproximatePrefixTree",
    "CacheAware",
    "LeastRequest",
    "LlmdScorers",
    "LoadIndex",
    "PowerOfTwo",
    "PrefixIndex",
    "RandomChoice",
    "RoundRobin",
    "TelemetryIndex",
]

BASELINES: dict[str, Callable[[random.Random], Strategy]] = {
    "round_robin": RoundRobin,
    "random": RandomChoice,
    "least_request": LeastRequest,
    "power_of_two": PowerOfTwo,
    "cache_aware": CacheAware,
    "llmd": LlmdScorers,
}
"""Peer strategies by the names `infermesh sim route --strategies` accepts."""

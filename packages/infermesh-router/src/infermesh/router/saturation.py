"""Fleet saturation of a model, from its replicas' queues and KV-cache pressure, and who is shed.

Each loaded, healthy replica's load is the larger of `waiting / saturation_waiting` and
`kv_cache_usage / saturation_kv_cache_usage`, capped at 1; the fleet's saturation is their mean.
A class is shed while saturation is above its `shed_at_load` (batch 0.8, standard 0.95, latency
1.0 = never), so `batch` goes first and `latency` last. Pure: never reads state or a clock.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from infermesh.core.model import ModelState

__all__ = ["SaturationThresholds", "fleet_saturation", "replica_load", "sheds"]


@attrs.frozen
class SaturationThresholds:
    """When one replica counts as fully saturated (`[router.admission]`)."""

    waiting: float = 8.0
    kv_cache_usage: float = 0.95

    def __attrs_post_init__(self) -> None:
        if not self.waiting > 0:
            raise ValueError(f"saturation_waiting must be > 0, got {self.waiting}")
        if not 0 < self.kv_cache_usage <= 1:
            raise ValueError(
                f"saturation_kv_cache_usage must be in (0, 1], got {self.kv_cache_usage}"
            )


def replica_load(state: ModelState, thresholds: SaturationThresholds) -> float:
    """0 (idle) .. 1 (saturated) for one replica."""
    queue = max(0.0, state.waiting) / thresholds.waiting
    memory = max(0.0, state.kv_cache_usage) / thresholds.kv_cache_usage
    return min(1.0, max(queue, memory))


def fleet_saturation(
    candidates: Iterable[ModelState], thresholds: SaturationThresholds
) -> float | None:
    """Mean load of the replicas that can take requests; None when none can (then the
    forwarder answers 404/503 and there is nothing to shed for)."""
    loads = [
        replica_load(state, thresholds)
        for state in candidates
        if state.loaded and state.healthy and not state.warming
    ]
    if not loads:
        return None
    return sum(loads) / len(loads)


def sheds(saturation: float | None, shed_at_load: float) -> bool:
    """Whether a class with this `shed_at_load` is refused at `saturation` (strictly above)."""
    return saturation is not None and saturation > shed_at_load

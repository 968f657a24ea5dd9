"""Prefix affinity: keeps requests sharing a prompt prefix on one replica until it is loaded.

The rendezvous (highest-random-weight) hash that orders the replicas for a prefix lives here
too, so the candidate sampler (infermesh.core.scoring.sampling) and the scorer agree on where a
prefix belongs.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import attrs

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import RequestFeatures
from infermesh.core.scoring.capacity import decode_rate

__all__ = ["PrefixAffinityScorer", "hrw_weight", "target_hash"]

_MASK64 = (1 << 64) - 1


@lru_cache(maxsize=65536)
def target_hash(target_id: str) -> int:
    """A target id's stable 64-bit hash (its rendezvous and ring position)."""
    return int.from_bytes(hashlib.blake2b(target_id.encode(), digest_size=8).digest(), "big")


def hrw_weight(prefix_key: int, target_id: str) -> int:
    """Rendezvous (highest-random-weight) weight of a target for a prefix key.

    Stable across processes and machines (no per-process hash seed), so every agent that sees
    the same candidates orders them the same way for a prefix.
    """
    x = (prefix_key ^ target_hash(target_id)) & _MASK64
    # splitmix64 finaliser: mixes every input bit into every output bit.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@attrs.frozen
class PrefixAffinityScorer:
    """Keeps requests sharing a prompt prefix on one replica until it is loaded.

    Bounded-load consistent hashing: the candidates are ordered by rendezvous hash of
    (prefix key, target); the first whose load (`TargetView.load`: running + waiting + unseen,
    corrected for what the routers did since the scrape) is below the capacity scores 1, the
    rest 0.
    The capacity is max(ceil(load_factor * (total load + 1) / candidates), min_capacity): the
    bounded-load rule, but never below `min_capacity`, so a replica that batches many sequences
    keeps its prefix (and its prefix cache) while the others are idle. Without a prefix key
    every target scores a neutral 0.5.

    A replica slower than the candidates' median measured decode rate (infermesh.core.scoring.
    capacity) gets that capacity scaled by its relative speed (at least 1): a GPU running at a
    quarter of the median speed keeps about a quarter of the hashed tenants. Faster replicas and
    replicas without a measured rate keep the full capacity.
    """

    load_factor: float = 1.25
    min_capacity: int = 4
    name: str = "prefix"
    default_weight: float = 3.0

    def configured(self, scoring: ScoringConfig) -> PrefixAffinityScorer:
        return attrs.evolve(
            self,
            load_factor=scoring.prefix_load_factor,
            min_capacity=scoring.prefix_min_capacity,
        )

    def score(self, request: RequestFeatures, targets: Sequence[TargetView]) -> list[ScoreResult]:
        count = len(targets)
        prefix_key = request.prefix_key
        if prefix_key == 0 or count == 0:
            neutral = ScoreResult(0.5, "no prefix key: neutral")
            return [neutral] * count
        loads = [v.load for v in targets]
        bounded = math.ceil(self.load_factor * (sum(loads) + 1) / count)
        capacity = max(bounded, self.min_capacity)
        caps = _speed_capacities(targets, capacity)
        weights = [hrw_weight(prefix_key, v.key.target_id) for v in targets]
        order = sorted(range(count), key=weights.__getitem__, reverse=True)
        if caps is None:
            chosen_rank = next((r for r, i in enumerate(order) if loads[i] < capacity), None)
        else:
            chosen_rank = next((r for r, i in enumerate(order) if loads[i] < caps[i][0]), None)
        if chosen_rank is None:  # only reachable with load_factor < 1
            chosen_rank = min(range(count), key=lambda r: loads[order[r]])
        chosen = order[chosen_rank]
        deferred = ScoreResult.deferred
        results: list[ScoreResult] = [_UNSET] * count
        placed = chosen_rank + 1
        for rank, i in enumerate(order):
            mine = i == chosen
            results[i] = deferred(
                1.0 if mine else 0.0,
                _prefix_reason,
                prefix_key,
                rank,
                count,
                loads[i],
                capacity if caps is None else caps[i][0],
                bounded,
                0 if mine else placed,
                1.0 if caps is None else caps[i][1],
            )
        return results


_UNSET = ScoreResult(0.0, "")


def _speed_capacities(
    targets: Sequence[TargetView], capacity: int
) -> list[tuple[int, float]] | None:
    """Each target's prefix capacity and relative speed, or None when no target is slower than
    the median measured decode rate (then every target has `capacity`)."""
    rates = [decode_rate(v.state) for v in targets]
    measured = sorted(r.tokens_per_s for r in rates if r is not None)
    if len(measured) < 2:
        return None
    middle = len(measured) // 2
    median = (
        measured[middle] if len(measured) % 2 else (measured[middle - 1] + measured[middle]) / 2
    )
    if not (median > 0 and measured[0] < median):
        return None
    caps: list[tuple[int, float]] = []
    for rate in rates:
        rel = 1.0 if rate is None else min(1.0, rate.tokens_per_s / median)
        caps.append((capacity if rel >= 1.0 else max(1, math.ceil(capacity * rel)), rel))
    return caps


def _prefix_reason(
    prefix_key: int,
    rank: int,
    count: int,
    load: float,
    capacity: int,
    bounded: int,
    chosen_rank: int,
    speed: float = 1.0,
) -> str:
    """Why a target got its prefix score; `chosen_rank` is 0 for the chosen target itself, else
    the 1-based rendezvous rank of the chosen one."""
    if speed < 1.0:
        capacity_text = f"capacity {capacity} (scaled to its {speed:.2g}x median decode speed)"
    elif capacity > bounded:
        capacity_text = f"capacity {capacity} (minimum; bounded-load {bounded})"
    else:
        capacity_text = f"capacity {capacity} (bounded-load)"
    prefix = f"prefix {prefix_key:016x}"
    if not chosen_rank:
        relation = "<" if load < capacity else ">="
        reason = (
            f"{prefix} placed here (rendezvous rank {rank + 1}/{count}), "
            f"load {load:g} {relation} {capacity_text}"
        )
        if rank:
            reason += f"; spilled past {rank} loaded replica(s)"
        return reason
    if load >= capacity:
        why = f"loaded (load {load:g} >= {capacity_text})"
    else:  # ranked after the chosen one, which is the first with room
        why = f"not chosen: rank {chosen_rank} has room (load {load:g}, {capacity_text})"
    return f"{prefix} rendezvous rank {rank + 1}/{count}, {why}"

"""Bounded candidate sets: which of a big model's replicas one decision scores.

Scoring every replica costs ~20 µs each, so at 10,000 replicas one decision takes hundreds of
milliseconds. Above `scoring.max_candidates` the engine scores at most that many, chosen as

1. the prefix owners: the `owners` successors of the request's prefix key on a consistent-hash
   ring of the model's targets (rebuilt only when membership changes), so requests sharing a
   prefix keep meeting the same replicas;
2. the least loaded: the `max_candidates // 4` targets with the least scraped running + waiting,
   recomputed at most every `refresh_s` of the injected clock (the engine adds its own in-flight
   requests when it scores them, so a stale pick that has since filled up scores low);
3. a random sample of the rest (a seeded `random.Random`: same seed and calls, same picks).

The trade-off: the best replica of the whole fleet is scored only when it is among these, so
a decision is near-best (the queue scorer sees the least loaded and a fair sample of the
rest), not best; and the prefix scorer's bounded-load capacity is computed over the scored set.
A non-owner whose rendezvous weight beats every owner's for the request's prefix is skipped,
so the prefix always lands on an owner while one has room. Pure: no clock, no I/O.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Iterator

from infermesh.core.model import ModelState, TargetKey
from infermesh.core.scoring.prefix import hrw_weight, target_hash

__all__ = ["CandidateSampler"]

OWNERS = 8
"""Prefix owners scored per request (ring successors of its prefix key)."""
LOW_LOAD_REFRESH_S = 1.0
"""How often (injected clock) the least-loaded targets of a model are recomputed."""
_MAX_ENTRIES = 1024


class CandidateSampler:
    """Yields candidate indices in the order the engine should try them (deduplicated)."""

    def __init__(
        self,
        max_candidates: int,
        *,
        seed: int = 0,
        owners: int = OWNERS,
        refresh_s: float = LOW_LOAD_REFRESH_S,
    ) -> None:
        self.max_candidates = max_candidates
        self.owners = min(owners, max_candidates)
        self.low_load = max(1, max_candidates // 4)
        self.refresh_s = refresh_s
        self._rng = random.Random(seed)
        # model -> (its keys tuple, ring hashes ascending, candidate index of each)
        self._rings: dict[str, tuple[tuple[TargetKey, ...], list[int], list[int]]] = {}
        # model -> (its keys tuple, when computed, least-loaded indices)
        self._low: dict[str, tuple[tuple[TargetKey, ...], float, tuple[int, ...]]] = {}

    def applies(self, count: int) -> bool:
        return 0 < self.max_candidates < count

    def order(
        self,
        model: str,
        keys: tuple[TargetKey, ...],
        candidates: tuple[ModelState, ...],
        target_ids: tuple[str, ...],
        prefix_key: int,
        now: float,
    ) -> Iterator[int]:
        """Indices into `candidates`: owners, then least loaded, then random ones, each once.

        The caller stops once it has `max_candidates` usable targets; the random part ends
        after `2 * max_candidates` draws."""
        count = len(candidates)
        seen: set[int] = set()
        owners = self._owners(model, keys, target_ids, prefix_key) if prefix_key else ()
        for i in owners:
            seen.add(i)
            yield i
        top = max((hrw_weight(prefix_key, target_ids[i]) for i in owners), default=None)

        def beats_owners(i: int) -> bool:
            return top is not None and hrw_weight(prefix_key, target_ids[i]) > top

        for i in self._least_loaded(model, keys, candidates, now):
            if i not in seen and not beats_owners(i):
                seen.add(i)
                yield i
        randrange = self._rng.randrange
        for _ in range(2 * self.max_candidates):
            i = randrange(count)
            if i not in seen and not beats_owners(i):
                seen.add(i)
                yield i

    def _owners(
        self, model: str, keys: tuple[TargetKey, ...], target_ids: tuple[str, ...], prefix_key: int
    ) -> list[int]:
        ring = self._rings.get(model)
        if ring is None or ring[0] is not keys:
            if len(self._rings) >= _MAX_ENTRIES:
                self._rings.clear()
            points = sorted((target_hash(tid), i) for i, tid in enumerate(target_ids))
            ring = (keys, [h for h, _ in points], [i for _, i in points])
            self._rings[model] = ring
        _, hashes, indices = ring
        start = bisect.bisect_left(hashes, prefix_key)
        count = len(indices)
        return [indices[(start + j) % count] for j in range(min(self.owners, count))]

    def _least_loaded(
        self,
        model: str,
        keys: tuple[TargetKey, ...],
        candidates: tuple[ModelState, ...],
        now: float,
    ) -> tuple[int, ...]:
        cached = self._low.get(model)
        if cached is not None and cached[0] is keys and 0.0 <= now - cached[1] < self.refresh_s:
            return cached[2]
        if len(self._low) >= _MAX_ENTRIES:
            self._low.clear()
        low = tuple(
            heapq.nsmallest(
                self.low_load,
                range(len(candidates)),
                key=lambda i: _load(candidates[i]),
            )
        )
        self._low[model] = (keys, now, low)
        return low


def _load(state: ModelState) -> float:
    """Scraped running + waiting; a target that cannot serve sorts last."""
    if not state.loaded or state.warming or not state.healthy:
        return float("inf")
    return state.running + state.waiting

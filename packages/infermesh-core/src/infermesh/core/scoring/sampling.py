"""Bounded candidate sets: which of a big model's replicas one decision scores.

Scoring every replica costs ~20 µs each, so at 10,000 replicas one decision takes hundreds of
milliseconds. Above `scoring.max_candidates` the engine scores at most that many, chosen as

1. the prefix owners: the replicas the prefix scorer would favour, i.e. where the request's
   prefix keys were sent recently (its `PrefixIndex`, deepest match first, at most `owners`),
   so the cap never hides the replica that holds the prompt's prefix;
2. the least loaded: the `max_candidates // 4` targets with the least scraped running + waiting,
   recomputed at most every `refresh_s` of the injected clock (the engine adds its own in-flight
   requests when it scores them, so a stale pick that has since filled up scores low);
3. a random sample of the rest (a seeded `random.Random`: same seed and calls, same picks).

The trade-off: the best replica of the whole fleet is scored only when it is among these, so
a decision is near-best (the queue scorer sees the least loaded and a fair sample of the
rest), not best; and the prefix scorer's bounded-load capacity is computed over the scored set.
Pure: no clock, no I/O.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator, Sequence

from infermesh.core.model import RequestFeatures, TargetKey
from infermesh.core.scoring.prefix import PrefixIndex, request_prefix_keys
from infermesh.core.scoring.rows import CandidateRow

__all__ = ["CandidateSampler"]

OWNERS = 8
"""Prefix owners scored per request (replicas its prefix was sent to recently)."""
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
        scorers: Iterable[object] = (),
    ) -> None:
        """`scorers`: the engine's scorers; the first with a `PrefixIndex` as `index` (the
        prefix scorer) supplies the prefix owners."""
        self.max_candidates = max_candidates
        self.owners = min(owners, max_candidates)
        self.low_load = max(1, max_candidates // 4)
        self.refresh_s = refresh_s
        self._rng = random.Random(seed)
        self.prefix_index = next(
            (
                index
                for index in (getattr(s, "index", None) for s in scorers)
                if isinstance(index, PrefixIndex)
            ),
            None,
        )
        # model -> (its keys tuple, target id -> candidate index)
        self._positions: dict[str, tuple[tuple[TargetKey, ...], dict[str, int]]] = {}
        # model -> (its keys tuple, when computed, least-loaded indices)
        self._low: dict[str, tuple[tuple[TargetKey, ...], float, tuple[int, ...]]] = {}

    def applies(self, count: int) -> bool:
        return 0 < self.max_candidates < count

    def order(
        self,
        model: str,
        keys: tuple[TargetKey, ...],
        rows: Sequence[CandidateRow],
        target_ids: tuple[str, ...],
        request: RequestFeatures,
        now: float,
    ) -> Iterator[int]:
        """Indices into the model's candidate `rows` (`StateStore.candidate_rows`): owners,
        then least loaded, then random ones, each once.

        The caller stops once it has `max_candidates` usable targets; the random part ends
        after `2 * max_candidates` draws."""
        count = len(rows)
        seen: set[int] = set()
        for i in self._owners(model, keys, target_ids, request, now):
            seen.add(i)
            yield i
        for i in self._least_loaded(model, keys, rows, now):
            if i not in seen:
                seen.add(i)
                yield i
        # `self._rng.randrange(count)`, inlined: the same draws from the same generator (what
        # `Random._randbelow` does: `count.bit_length()` random bits, redrawn while >= count),
        # without two Python-level calls per draw.
        getrandbits = self._rng.getrandbits
        bits = count.bit_length()
        for _ in range(2 * self.max_candidates):
            i = getrandbits(bits)
            while i >= count:
                i = getrandbits(bits)
            if i not in seen:
                seen.add(i)
                yield i

    def _owners(
        self,
        model: str,
        keys: tuple[TargetKey, ...],
        target_ids: tuple[str, ...],
        request: RequestFeatures,
        now: float,
    ) -> list[int]:
        """Where the prefix scorer would look: the recent homes of the request's prefix keys,
        deepest match first."""
        index = self.prefix_index
        prefix_keys = request_prefix_keys(request)
        if index is None or not prefix_keys or not self.owners:
            return []
        cached = self._positions.get(model)
        if cached is None or cached[0] is not keys:
            if len(self._positions) >= _MAX_ENTRIES:
                self._positions.clear()
            cached = (keys, {tid: i for i, tid in enumerate(target_ids)})
            self._positions[model] = cached
        position = cached[1]
        owners: list[int] = []
        for _, homes in index.matches(prefix_keys, now):
            for tid in homes:
                i = position.get(tid)
                if i is not None and i not in owners:
                    owners.append(i)
                    if len(owners) >= self.owners:
                        return owners
        return owners

    def _least_loaded(
        self,
        model: str,
        keys: tuple[TargetKey, ...],
        rows: Sequence[CandidateRow],
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
                range(len(rows)),
                key=lambda i: _load(rows[i]),
            )
        )
        self._low[model] = (keys, now, low)
        return low


def _load(row: CandidateRow) -> float:
    """Scraped running + waiting; a target that cannot serve sorts last."""
    state = row.state
    if not state.loaded or state.warming or not state.healthy:
        return float("inf")
    return row.load

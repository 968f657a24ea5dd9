"""vllm-router's `cache_aware` policy: an approximate prefix tree per worker of what it was sent,
followed while the fleet is balanced, and shortest queue when it is not.

Source: vllm-project/router (forked from SGLang's sgl-router), `src/policies/cache_aware.rs` and
its CLI defaults: `cache_threshold` 0.3, `balance_abs_threshold` 64, `balance_rel_threshold` 1.5,
`eviction_interval` 120 s, `max_tree_size` 2**26 (characters per worker). Per request:

1. load = the router's own in-flight count per worker; the fleet is *imbalanced* when
   `max - min > balance_abs_threshold` and `max > balance_rel_threshold * min`; then the
   least-loaded worker gets the request (its prompt still goes into the tree).
2. Otherwise the prompt is matched against the tree; if the matched share of the prompt is above
   `cache_threshold`, the worker that most recently took that prefix gets it, else the worker
   with the smallest tree ("most cache room").
3. The chosen worker's tree gains the prompt; every eviction interval, trees over
   `max_tree_size` lose their least recently used leaves.

The real tree holds request text by character; this one holds the prompt's chained KV-block
hashes (16 tokens, about 64 characters each), which is the same tree at block granularity. It
sees only what the router sent, never the replicas' real caches, exactly like the original.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Sequence

from infermesh.dev.sim.route.baselines.load_index import LoadIndex
from infermesh.dev.sim.route.strategy import BLOCK_SIZE, ReplicaView, SimRequest, block_hashes
from infermesh.dev.tokens import CHARS_PER_TOKEN

__all__ = ["ApproximatePrefixTree", "CacheAware"]


class ApproximatePrefixTree:
    """Which worker was sent which prompt blocks; leaves evicted least recently used first."""

    def __init__(self, num_workers: int) -> None:
        # Block hash -> workers that hold it, most recent last.
        self._holders: dict[int, OrderedDict[int, None]] = {}
        # Worker -> its blocks, least recently used first (a leaf before its ancestors).
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_workers)]
        # Lazy min-heap of (size, worker) for the smallest tree; stale entries are skipped.
        self._sizes: list[tuple[int, int]] = [(0, worker) for worker in range(num_workers)]

    def size(self, worker: int) -> int:
        """Blocks in `worker`'s tree."""
        return len(self._blocks[worker])

    def match(self, hashes: Sequence[int]) -> tuple[int, int | None]:
        """(matched blocks, the worker that most recently took the deepest matched block)."""
        matched = 0
        for block_hash in hashes:
            if block_hash not in self._holders:
                break
            matched += 1
        if matched == 0:
            return 0, None
        return matched, next(reversed(self._holders[hashes[matched - 1]]))

    def insert(self, hashes: Sequence[int], worker: int) -> None:
        blocks = self._blocks[worker]
        # Deepest first, so a prompt's root block is the most recent: leaves are evicted first.
        for block_hash in reversed(hashes):
            holders = self._holders.setdefault(block_hash, OrderedDict())
            holders[worker] = None
            holders.move_to_end(worker)
            blocks[block_hash] = None
            blocks.move_to_end(block_hash)
        self._push_size(worker)

    def _push_size(self, worker: int) -> None:
        heapq.heappush(self._sizes, (len(self._blocks[worker]), worker))
        if len(self._sizes) > 4 * len(self._blocks) + 1024:  # drop the stale entries
            self._sizes = [(len(blocks), w) for w, blocks in enumerate(self._blocks)]
            heapq.heapify(self._sizes)

    def evict(self, max_blocks: int) -> None:
        """Shrink every tree over `max_blocks` to `max_blocks`, least recently used first."""
        for worker, blocks in enumerate(self._blocks):
            if len(blocks) <= max_blocks:
                continue
            while len(blocks) > max_blocks:
                block_hash, _ = blocks.popitem(last=False)
                holders = self._holders[block_hash]
                del holders[worker]
                if not holders:
                    del self._holders[block_hash]
            self._push_size(worker)

    def smallest(self) -> int:
        """The worker with the smallest tree (lowest index among equals)."""
        while True:
            size, worker = self._sizes[0]
            if size == len(self._blocks[worker]):
                return worker
            heapq.heappop(self._sizes)


class CacheAware:
    """vllm-router `cache_aware` with its published defaults (see the module docstring)."""

    name = "cache_aware"

    def __init__(
        self,
        rng: random.Random,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 120.0,
        max_tree_size_chars: int = 2**26,
    ) -> None:
        self._rng = rng
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_blocks = max(1, max_tree_size_chars // (CHARS_PER_TOKEN * BLOCK_SIZE))
        self._next_eviction_s = eviction_interval_s
        self._loads: LoadIndex | None = None
        self.tree = ApproximatePrefixTree(0)
        self._index_of: dict[str, int] = {}

    def imbalanced(self) -> bool:
        """vllm-router's rule: both the absolute and the relative load gap are exceeded."""
        assert self._loads is not None
        low, high = self._loads.min_load, self._loads.max_load
        return high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low

    def choose(self, request: SimRequest, replicas: Sequence[ReplicaView], now: float) -> str:
        if self._loads is None or len(self._loads.loads) != len(replicas):
            self._loads = LoadIndex(len(replicas))
            self.tree = ApproximatePrefixTree(len(replicas))
            self._index_of = {view.replica_id: i for i, view in enumerate(replicas)}
        if now >= self._next_eviction_s:
            self.tree.evict(self.max_tree_blocks)
            self._next_eviction_s = now + self.eviction_interval_s
        hashes = block_hashes(request)
        if self.imbalanced():
            chosen = self._loads.least_loaded(self._rng)
        else:
            matched, holder = self.tree.match(hashes)
            match_rate = matched * BLOCK_SIZE / request.prompt_tokens
            if holder is not None and match_rate > self.cache_threshold:
                chosen = holder
            else:
                chosen = self.tree.smallest()
        self.tree.insert(hashes, chosen)
        self._loads.started(chosen)
        return replicas[chosen].replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        if self._loads is not None and replica_id in self._index_of:
            self._loads.finished(self._index_of[replica_id])

"""KV-cache block pool with a prefix cache, as vLLM's V1 block manager keeps it.

Blocks are reference-counted; a freed block keeps its content hash and stays findable until the
allocator reuses it (least recently freed first), so a freed prompt prefix is an LRU cache entry.
Never-used blocks are handed out before any cached block is evicted, as in vLLM, whose free queue
starts with every block in id order. The pool is lazy: memory grows with the blocks ever used,
not with `num_blocks`, so a simulation of thousands of 80 GB replicas stays small.
Pure bookkeeping: no clock, no I/O, nothing about requests or scheduling.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["BlockPool", "hash_prompt_blocks"]


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Chained hashes of each full block of `token_ids`: block i's hash covers blocks 0..i.

    Python hashes tuples of ints the same way in every process (no hash randomisation), so two
    emulators agree on the hashes of one prompt.
    """
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


class BlockPool:
    """`num_blocks` KV blocks: allocation, reference counts, and the content-hash index."""

    def __init__(self, num_blocks: int, *, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.num_evictions = 0
        """Cached blocks whose content was dropped to reuse the block (prefix-cache evictions)."""
        self._ref_counts: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._block_of_hash: dict[int, int] = {}
        self._next_fresh = 0  # blocks [_next_fresh, num_blocks) were never used
        # Used-then-freed blocks, least recently freed first; cached ones are evicted when popped.
        self._free: OrderedDict[int, None] = OrderedDict()

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any sequence (cached-but-free blocks count as free)."""
        return self.num_blocks - self._next_fresh + len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by sequences, 0..1 (vLLM's kv_cache_usage_perc)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix of `block_hashes`; changes nothing."""
        if not self.enable_prefix_caching:
            return []
        found: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_free_among(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` are free now (touching them takes them off the free list)."""
        return sum(1 for block_id in block_ids if self._ref_counts.get(block_id, 0) == 0)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by `lookup`."""
        for block_id in block_ids:
            count = self._ref_counts.get(block_id, 0)
            if count == 0:
                del self._free[block_id]
            self._ref_counts[block_id] = count + 1

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks: never-used ones first, then freed ones (evicting their cached
        content, least recently freed first); None if fewer than `count` are free."""
        if count > self.num_free_blocks:
            return None
        blocks: list[int] = []
        for _ in range(count):
            if self._next_fresh < self.num_blocks:
                block_id = self._next_fresh
                self._next_fresh += 1
            else:
                block_id, _unused = self._free.popitem(last=False)
                old_hash = self._hash_of.pop(block_id, None)
                if old_hash is not None:
                    if self._block_of_hash.get(old_hash) == block_id:
                        del self._block_of_hash[old_hash]
                    self.num_evictions += 1
            self._ref_counts[block_id] = 1
            blocks.append(block_id)
        return blocks

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; unreferenced blocks become free, still cached.

        Freed in reverse so a sequence's tail blocks are evicted before its shared head blocks.
        """
        for block_id in reversed(block_ids):
            count = self._ref_counts.get(block_id, 0)
            if count <= 0:
                raise ValueError(f"block {block_id} freed more often than it was taken")
            if count == 1:
                del self._ref_counts[block_id]
                self._free[block_id] = None
            else:
                self._ref_counts[block_id] = count - 1

    def register(self, block_id: int, block_hash: int) -> None:
        """Record that `block_id` now holds the full block whose chained hash is `block_hash`."""
        if not self.enable_prefix_caching or block_id in self._hash_of:
            return
        if block_hash in self._block_of_hash:
            return  # another block already holds this content; keep the first one findable
        self._hash_of[block_id] = block_hash
        self._block_of_hash[block_hash] = block_id

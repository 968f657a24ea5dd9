"""Pods grouped by their last scraped (waiting, KV usage), so llm-d's queue + KV score of a
10,000-pod fleet is maximised in O(distinct queue lengths) instead of O(pods).

For a fixed waiting-queue length the pod with the lowest KV usage scores best, so each queue
length keeps a lazy min-heap of KV usages and each exact (waiting, kv) pair its pods.
Bookkeeping only: the caller feeds it every telemetry change.
"""

from __future__ import annotations

import heapq

from infermesh.dev.sim.route.baselines.load_index import Bucket

__all__ = ["TelemetryIndex"]


class TelemetryIndex:
    """Pods 0..n-1 by (waiting, kv_usage); all start at (0, 0.0)."""

    def __init__(self, num_pods: int) -> None:
        self.waiting = [0] * num_pods
        self.kv_usage = [0.0] * num_pods
        self._per_waiting: dict[int, int] = {0: num_pods} if num_pods else {}
        self._kv_heaps: dict[int, list[float]] = {0: [0.0]} if num_pods else {}
        self._kvs: dict[int, set[float]] = {0: {0.0}} if num_pods else {}
        first = Bucket()
        for pod in range(num_pods):
            first.add(pod)
        self._groups: dict[tuple[int, float], Bucket] = {(0, 0.0): first} if num_pods else {}

    def update(self, pod: int, waiting: int, kv_usage: float) -> None:
        old = (self.waiting[pod], self.kv_usage[pod])
        if old == (waiting, kv_usage):
            return
        group = self._groups[old]
        group.remove(pod)
        if not group.members:
            del self._groups[old]
            self._kvs[old[0]].discard(old[1])
        self._per_waiting[old[0]] -= 1
        if not self._per_waiting[old[0]]:
            del self._per_waiting[old[0]]
            del self._kv_heaps[old[0]]
            del self._kvs[old[0]]
        self.waiting[pod], self.kv_usage[pod] = waiting, kv_usage
        self._per_waiting[waiting] = self._per_waiting.get(waiting, 0) + 1
        new = (waiting, kv_usage)
        if new not in self._groups:
            self._groups[new] = Bucket()
            kvs = self._kvs.setdefault(waiting, set())
            kvs.add(kv_usage)
            heap = self._kv_heaps.setdefault(waiting, [])
            heapq.heappush(heap, kv_usage)
            if len(heap) > 2 * len(kvs) + 64:  # mostly stale entries: rebuild
                self._kv_heaps[waiting] = heap = list(kvs)
                heapq.heapify(heap)
        self._groups[new].add(pod)

    def waiting_range(self) -> tuple[int, int]:
        """(shortest, longest) waiting queue over all pods."""
        return min(self._per_waiting), max(self._per_waiting)

    def best_per_waiting(self) -> list[tuple[int, float, list[int]]]:
        """For each waiting length: (waiting, lowest kv_usage, the pods with both)."""
        best: list[tuple[int, float, list[int]]] = []
        for waiting, heap in self._kv_heaps.items():
            while (waiting, heap[0]) not in self._groups:  # a group that emptied: stale
                heapq.heappop(heap)
            best.append((waiting, heap[0], self._groups[waiting, heap[0]].members))
        return best

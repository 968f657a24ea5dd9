"""The router's own in-flight count per replica, with the least and most loaded found in O(1).

Counts move by one per routed or finished request, so replicas sit in buckets by count and the
lowest and highest non-empty buckets are tracked as they change. Pure bookkeeping: no views,
no clock.
"""

from __future__ import annotations

import random

__all__ = ["Bucket", "LoadIndex"]


class Bucket:
    """Replica indexes with one load, removable in O(1) (swap with the last)."""

    __slots__ = ("members", "position")

    def __init__(self) -> None:
        self.members: list[int] = []
        self.position: dict[int, int] = {}

    def add(self, replica: int) -> None:
        self.position[replica] = len(self.members)
        self.members.append(replica)

    def remove(self, replica: int) -> None:
        slot = self.position.pop(replica)
        last = self.members.pop()
        if last != replica:
            self.members[slot] = last
            self.position[last] = slot


class LoadIndex:
    """In-flight requests per replica (indexes 0..n-1), all starting at zero."""

    def __init__(self, num_replicas: int) -> None:
        if num_replicas < 1:
            raise ValueError("a fleet needs at least one replica")
        self.loads = [0] * num_replicas
        first = Bucket()
        for replica in range(num_replicas):
            first.add(replica)
        self._buckets: dict[int, Bucket] = {0: first}
        self.min_load = 0
        self.max_load = 0

    def _move(self, replica: int, delta: int) -> None:
        old = self.loads[replica]
        new = old + delta
        bucket = self._buckets[old]
        bucket.remove(replica)
        self._buckets.setdefault(new, Bucket()).add(replica)
        self.loads[replica] = new
        self.min_load = min(self.min_load, new)
        self.max_load = max(self.max_load, new)
        if not bucket.members:
            del self._buckets[old]
            # Counts move by one, so an emptied extreme bucket's neighbour is the new extreme.
            if old == self.min_load:
                self.min_load = old + delta
            if old == self.max_load:
                self.max_load = old + delta

    def started(self, replica: int) -> None:
        self._move(replica, +1)

    def finished(self, replica: int) -> None:
        if self.loads[replica] > 0:
            self._move(replica, -1)

    def least_loaded(self, rng: random.Random) -> int:
        """A replica with the lowest count (ties broken by `rng`)."""
        members = self._buckets[self.min_load].members
        return members[rng.randrange(len(members))] if len(members) > 1 else members[0]

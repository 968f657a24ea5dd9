"""The queue of membership updates piggybacked on outgoing messages, with a retransmit limit.

Pure bookkeeping: it decides which updates ride on the next message; it never sends anything.
"""

from __future__ import annotations

import heapq
import math

import attrs

from infermesh.agent.gossip.messages import Update

__all__ = ["BroadcastQueue", "retransmit_limit"]


def retransmit_limit(retransmit_mult: int, cluster_size: int) -> int:
    """memberlist's limit: RetransmitMult x ceil(log10(N + 1))."""
    return retransmit_mult * math.ceil(math.log10(cluster_size + 1))


@attrs.define(eq=False)
class _Queued:
    update: Update
    transmits: int
    order: int


@attrs.define
class BroadcastQueue:
    """At most one pending update per member; a newer update replaces the older one.

    A heap ordered by (transmits, newest first) makes `take` O(k log n); entries of replaced
    updates stay in the heap until they surface and are skipped.
    """

    _by_member: dict[str, _Queued] = attrs.field(factory=dict)
    _heap: list[tuple[int, int, _Queued]] = attrs.field(factory=list)
    _order: int = 0

    def push(self, update: Update) -> None:
        self._order += 1
        queued = _Queued(update, 0, self._order)
        self._by_member[update.member] = queued
        if len(self._heap) > 2 * len(self._by_member) + 64:
            self._heap = [(q.transmits, -q.order, q) for q in self._by_member.values()]
            heapq.heapify(self._heap)
        else:
            heapq.heappush(self._heap, (0, -queued.order, queued))

    def __len__(self) -> int:
        return len(self._by_member)

    def pending(self) -> tuple[Update, ...]:
        return tuple(queued.update for queued in self._by_member.values())

    def take(self, max_updates: int, limit: int) -> tuple[Update, ...]:
        """The least-sent updates, newest first, counted as sent once more; spent ones leave."""
        heap, by_member = self._heap, self._by_member
        chosen: list[_Queued] = []
        while heap and len(chosen) < max_updates:
            queued = heapq.heappop(heap)[2]
            if by_member.get(queued.update.member) is queued:
                chosen.append(queued)
        for queued in chosen:
            queued.transmits += 1
            if queued.transmits >= limit:
                del by_member[queued.update.member]
            else:
                heapq.heappush(heap, (queued.transmits, -queued.order, queued))
        return tuple(queued.update for queued in chosen)

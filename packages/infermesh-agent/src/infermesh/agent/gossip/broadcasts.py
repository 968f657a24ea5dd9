"""The queue of membership updates piggybacked on outgoing messages, with a retransmit limit.

Pure bookkeeping: it decides which updates ride on the next message; it never sends anything.
"""

from __future__ import annotations

import math

import attrs

from infermesh.agent.gossip.messages import Update

__all__ = ["BroadcastQueue", "retransmit_limit"]


def retransmit_limit(retransmit_mult: int, cluster_size: int) -> int:
    """memberlist's limit: RetransmitMult x ceil(log10(N + 1))."""
    return retransmit_mult * math.ceil(math.log10(cluster_size + 1))


@attrs.define
class _Queued:
    update: Update
    transmits: int
    order: int


@attrs.define
class BroadcastQueue:
    """At most one pending update per member; a newer update replaces the older one."""

    _by_member: dict[str, _Queued] = attrs.field(factory=dict)
    _order: int = 0

    def push(self, update: Update) -> None:
        self._order += 1
        self._by_member[update.member] = _Queued(update, 0, self._order)

    def __len__(self) -> int:
        return len(self._by_member)

    def pending(self) -> tuple[Update, ...]:
        return tuple(queued.update for queued in self._by_member.values())

    def take(self, max_updates: int, limit: int) -> tuple[Update, ...]:
        """The least-sent updates, counted as sent once more; spent ones leave the queue."""
        chosen = sorted(self._by_member.values(), key=lambda q: (q.transmits, -q.order))
        chosen = chosen[:max_updates]
        for queued in chosen:
            queued.transmits += 1
            if queued.transmits >= limit:
                del self._by_member[queued.update.member]
        return tuple(queued.update for queued in chosen)

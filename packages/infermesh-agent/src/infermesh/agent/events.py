"""The agent's event journal: node, model, policy and drain events, numbered and kept in memory.

Sans-I/O apart from one asyncio.Event for wake-ups (the pattern of policy/broadcast.py): the
journal keeps the newest `capacity` events in a ring, numbers them 1, 2, 3, ... and answers
"everything after seq N". A subscriber that asks for events the ring no longer holds gets a
`gap` event first, so it knows it missed some. Writers never wait for readers: a slow
subscriber only falls behind, and the ring never grows past `capacity`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping

import attrs

__all__ = ["DEFAULT_CAPACITY", "EVENT_KINDS", "Event", "EventJournal"]

DEFAULT_CAPACITY = 4096
"""Events an agent keeps for replay; older ones are dropped (a subscriber then sees a gap)."""

EVENT_KINDS = ("node", "model", "policy", "drain")
"""The kinds a subscriber may filter on (`gap` is always delivered)."""


def _frozen_attributes(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(sorted((str(k), str(v)) for k, v in value.items()))


@attrs.frozen
class Event:
    """One thing that happened, as the agent recorded it (fields as in control.proto's Event)."""

    seq: int
    time: float
    kind: str
    action: str
    subject: str
    node: str = ""
    message: str = ""
    attributes: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_attributes, hash=False
    )
    recorded_by: str = ""


class EventJournal:
    """The newest `capacity` events of one agent, numbered from 1, with wake-ups for followers."""

    def __init__(
        self,
        recorded_by: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.recorded_by = recorded_by
        self._events: deque[Event] = deque(maxlen=capacity)
        self._clock = clock
        self._last_seq = 0
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def last_seq(self) -> int:
        """The seq of the newest event (0 before the first)."""
        return self._last_seq

    @property
    def closed(self) -> bool:
        return self._closed

    def append(
        self,
        kind: str,
        action: str,
        subject: str,
        node: str = "",
        message: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> Event:
        """Record one event now and wake every follower; never blocks."""
        self._last_seq += 1
        event = Event(
            seq=self._last_seq,
            time=self._clock(),
            kind=kind,
            action=action,
            subject=subject,
            node=node,
            message=message,
            attributes=attributes or {},
            recorded_by=self.recorded_by,
        )
        self._events.append(event)
        self._wake()
        return event

    def since(self, after_seq: int, kinds: Collection[str] = ()) -> list[Event]:
        """Events after `after_seq` (0: the oldest kept), oldest first, of `kinds` (empty: all).

        When `after_seq` names an event the ring has dropped, or one this agent never recorded
        (it restarted and counts from 1 again), a `gap` event comes first. It carries the seq of
        the last event skipped, so a subscriber that resumes after it misses nothing more.
        """
        out: list[Event] = []
        oldest = self._events[0].seq if self._events else self._last_seq + 1
        if after_seq > self._last_seq:
            out.append(self._gap(after_seq, 0, restarted=True))
            after_seq = 0
        elif 0 < after_seq < oldest - 1:
            out.append(self._gap(after_seq, oldest - 1))
        start = max(0, after_seq - oldest + 1)
        for index in range(start, len(self._events)):
            event = self._events[index]
            if not kinds or event.kind in kinds:
                out.append(event)
        return out

    async def wait_after(self, seq: int) -> bool:
        """Return True once an event newer than `seq` is recorded, False once the journal is
        closed (the agent is stopping): followers end their streams then."""
        while self._last_seq <= seq:
            if self._closed:
                return False
            await self._changed.wait()
        return True

    def close(self) -> None:
        """End every follower's wait; events recorded later are still kept."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _gap(self, after_seq: int, last_skipped: int, *, restarted: bool = False) -> Event:
        if restarted:
            message = (
                f"this agent has recorded only {self._last_seq} events, not {after_seq}: it "
                "restarted and numbers its events from 1 again; replaying every event it kept"
            )
        else:
            message = (
                f"events {after_seq + 1} to {last_skipped} were dropped "
                f"(this agent keeps the newest {self._events.maxlen})"
            )
        return Event(
            seq=last_skipped,
            time=self._clock(),
            kind="gap",
            action="dropped",
            subject="events",
            message=message,
            attributes={"after_seq": str(after_seq), "last_skipped": str(last_skipped)},
            recorded_by=self.recorded_by,
        )

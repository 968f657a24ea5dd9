"""Admission by SLO class: per model, concurrency limits and bounded FIFO queues with deadlines.

A request runs at once when its class and its model have a free slot and no earlier request of
its class waits; otherwise it queues (up to `max_queue`, until its deadline) or is refused. A
freed slot goes to the oldest `latency` waiter, then `standard`, then `batch`. Pure: `now` is
passed in; nothing here sleeps, awaits, or reads a clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterator

import attrs

from infermesh.core.model import SloClass

__all__ = [
    "AdmissionQueues",
    "ClassLimits",
    "Queued",
    "Refusal",
    "Ticket",
    "Waiter",
    "WaiterState",
]

PRIORITY_ORDER = tuple(sorted(SloClass, key=lambda slo: slo.priority))
"""Classes in the order a freed slot is offered: latency, standard, batch."""
DEFAULT_HOLD_S = 1.0
"""Assumed time a request holds its slot before any has finished (for Retry-After)."""
HOLD_EWMA_ALPHA = 0.2
KEEP_MODELS = 256
"""Models whose state is kept while idle; past this, idle ones are forgotten."""


@attrs.frozen
class ClassLimits:
    """One SLO class's limits for one model (from `[router.admission.<class>]` or policy)."""

    max_concurrent: int
    max_queue: int
    max_queue_wait_s: float
    shed_at_load: float = 1.0


@attrs.define(eq=False)
class Ticket:
    """An admitted request's slot; give it back with `AdmissionQueues.release`."""

    model: str
    slo_class: SloClass
    admitted_at: float
    queued_s: float = 0.0
    """How long it waited in the queue (0 when admitted on arrival)."""
    released: bool = False


class WaiterState(enum.Enum):
    QUEUED = "queued"
    ADMITTED = "admitted"
    EXPIRED = "expired"
    ABANDONED = "abandoned"


@attrs.define(eq=False)
class Waiter:
    """A queued request. When `state` becomes ADMITTED, `ticket` holds its slot."""

    model: str
    slo_class: SloClass
    arrived_at: float
    deadline: float
    state: WaiterState = WaiterState.QUEUED
    ticket: Ticket | None = None
    retry_after_s: float = 0.0
    """For EXPIRED: when trying again is likely to find room."""


@attrs.frozen
class Queued:
    """The request waits in its class's queue; `waiter` changes state when it is settled."""

    waiter: Waiter


@attrs.frozen
class Refusal:
    """The request is refused: `reason` is `queue_full` (the queue is at `max_queue`)."""

    reason: str
    retry_after_s: float
    message: str


@attrs.define
class _ClassLane:
    in_flight: int = 0
    queue: deque[Waiter] = attrs.field(factory=deque)
    hold_s: float = DEFAULT_HOLD_S
    """EWMA of how long a request of this class holds its slot."""


@attrs.define
class _ModelGate:
    in_flight: int = 0
    lanes: dict[SloClass, _ClassLane] = attrs.field(
        factory=lambda: {slo: _ClassLane() for slo in SloClass}
    )

    def idle(self) -> bool:
        return self.in_flight == 0 and all(not lane.queue for lane in self.lanes.values())


class AdmissionQueues:
    """Slots and queues of every model, by SLO class.

    `limits(model, slo)` gives the class's limits (config, overridden by policy; asked on every
    decision so a new policy applies at once); `model_limit` caps the model's requests of all
    classes together, which is what makes the class priority matter.
    """

    def __init__(self, limits: Callable[[str, SloClass], ClassLimits], model_limit: int) -> None:
        if model_limit < 1:
            raise ValueError(f"model_limit must be >= 1, got {model_limit}")
        self.limits = limits
        self.model_limit = model_limit
        self._models: dict[str, _ModelGate] = {}

    # ------------------------------------------------------------------ events

    def arrive(self, model: str, slo: SloClass, now: float) -> Ticket | Queued | Refusal:
        """A request for `model` of class `slo` asks for a slot."""
        gate = self._models.get(model)
        if gate is None:
            if len(self._models) >= KEEP_MODELS:
                self._forget_idle()
            gate = self._models[model] = _ModelGate()
        lane = gate.lanes[slo]
        limits = self.limits(model, slo)
        if not lane.queue and self._has_room(gate, lane, limits):
            return self._admit(gate, lane, model, slo, now, now)
        if len(lane.queue) >= limits.max_queue:
            retry_after_s = self._drain_estimate_s(lane, limits, len(lane.queue) + 1)
            return Refusal(
                "queue_full",
                retry_after_s,
                f"the router is at its limit for {slo.value} requests to model {model!r}: "
                f"{lane.in_flight} running and {len(lane.queue)} waiting (max_queue "
                f"{limits.max_queue}); retry after the Retry-After delay",
            )
        waiter = Waiter(model, slo, now, now + limits.max_queue_wait_s)
        lane.queue.append(waiter)
        return Queued(waiter)

    def release(self, ticket: Ticket, now: float) -> list[Waiter]:
        """A request is over (done, failed or disconnected): free its slot. Returns the waiters
        admitted into freed room (their state is ADMITTED). Releasing twice does nothing."""
        if ticket.released:
            return []
        ticket.released = True
        gate = self._models[ticket.model]
        lane = gate.lanes[ticket.slo_class]
        lane.in_flight -= 1
        gate.in_flight -= 1
        held_s = max(0.0, now - ticket.admitted_at)
        lane.hold_s += HOLD_EWMA_ALPHA * (held_s - lane.hold_s)
        return self._pump(ticket.model, gate, now)

    def expire(self, now: float) -> list[Waiter]:
        """Remove every waiter whose deadline has passed (state EXPIRED, with a Retry-After).

        A class's waiters arrive in order and share its `max_queue_wait_s`, so their deadlines
        are in queue order: each queue is cut at its first waiter not yet due.
        """
        expired: list[Waiter] = []
        for model, gate in list(self._models.items()):
            for slo, lane in gate.lanes.items():
                queue = lane.queue
                while queue and queue[0].deadline <= now:
                    waiter = queue.popleft()
                    waiter.state = WaiterState.EXPIRED
                    waiter.retry_after_s = self._drain_estimate_s(
                        lane, self.limits(model, slo), len(queue) + 1
                    )
                    expired.append(waiter)
        return expired

    def abandon(self, waiter: Waiter, now: float) -> list[Waiter]:
        """The waiting client went away (or its wait was cancelled): leave the queue. A waiter
        already ADMITTED gives its slot back. Returns waiters admitted into freed room."""
        if waiter.state is WaiterState.ADMITTED and waiter.ticket is not None:
            waiter.state = WaiterState.ABANDONED
            return self.release(waiter.ticket, now)
        if waiter.state is WaiterState.QUEUED:
            waiter.state = WaiterState.ABANDONED
            gate = self._models.get(waiter.model)
            if gate is not None:
                gate.lanes[waiter.slo_class].queue.remove(waiter)
        return []

    def pump(self, now: float) -> list[Waiter]:
        """Admit waiters that now fit (after a policy raised a limit)."""
        admitted: list[Waiter] = []
        for model, gate in list(self._models.items()):
            admitted.extend(self._pump(model, gate, now))
        return admitted

    # ------------------------------------------------------------------ reads

    def in_flight(self, model: str, slo: SloClass) -> int:
        gate = self._models.get(model)
        return gate.lanes[slo].in_flight if gate is not None else 0

    def queued(self, model: str, slo: SloClass) -> int:
        gate = self._models.get(model)
        return len(gate.lanes[slo].queue) if gate is not None else 0

    def tracked_models(self) -> int:
        """Models whose slots, queues and hold estimates are held in memory."""
        return len(self._models)

    def next_deadline(self) -> float | None:
        """The earliest deadline of any waiter (None when nobody waits)."""
        heads = [
            lane.queue[0].deadline
            for gate in self._models.values()
            for lane in gate.lanes.values()
            if lane.queue
        ]
        return min(heads) if heads else None

    def levels(self) -> Iterator[tuple[str, SloClass, int, int]]:
        """(model, class, in flight, queued) for every model with requests running or waiting."""
        for model, gate in self._models.items():
            if gate.idle():
                continue
            for slo, lane in gate.lanes.items():
                yield model, slo, lane.in_flight, len(lane.queue)

    # ------------------------------------------------------------------ internals

    def _forget_idle(self) -> None:
        # Idle models keep their slot-hold estimates until this many models have been seen.
        for model in [name for name, gate in self._models.items() if gate.idle()]:
            del self._models[model]

    def _has_room(self, gate: _ModelGate, lane: _ClassLane, limits: ClassLimits) -> bool:
        return lane.in_flight < limits.max_concurrent and gate.in_flight < self.model_limit

    def _admit(
        self,
        gate: _ModelGate,
        lane: _ClassLane,
        model: str,
        slo: SloClass,
        arrived_at: float,
        now: float,
    ) -> Ticket:
        lane.in_flight += 1
        gate.in_flight += 1
        return Ticket(model, slo, now, queued_s=max(0.0, now - arrived_at))

    def _pump(self, model: str, gate: _ModelGate, now: float) -> list[Waiter]:
        admitted: list[Waiter] = []
        for slo in PRIORITY_ORDER:
            lane = gate.lanes[slo]
            if not lane.queue:
                continue
            limits = self.limits(model, slo)
            while lane.queue and self._has_room(gate, lane, limits):
                waiter = lane.queue.popleft()
                waiter.ticket = self._admit(gate, lane, model, slo, waiter.arrived_at, now)
                waiter.state = WaiterState.ADMITTED
                admitted.append(waiter)
        return admitted

    def _drain_estimate_s(self, lane: _ClassLane, limits: ClassLimits, position: int) -> float:
        """Seconds until `position` requests ahead of a newcomer have had a slot: each slot
        frees about every `hold_s`, and there are `max_concurrent` (at least 1) of them."""
        slots = max(1, min(limits.max_concurrent, self.model_limit))
        return max(1.0, lane.hold_s * position / slots)

"""Reports request outcomes to the agent in batches, off the request's hot path.

`report()` only appends to a bounded buffer and wakes a background task, which sends what has
gathered as one `ReportOutcome` batch. It never blocks or fails a response: when the agent is
unreachable the batch is dropped (the agent expires the reservations) and the loss is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable

from infermesh.core.logging import get_logger
from infermesh.core.proto import scoring_pb2

__all__ = ["OutcomeBuffer", "OutcomeReporter"]

log = get_logger(__name__)

# How long a batch gathers after the first outcome arrives (the default; each scoring mode sets
# its own). Each ReportOutcome call costs the router's loop about as much CPU as forwarding a
# request, so outcomes must not go one by one; 50 ms is far below a scrape interval.
LINGER_S = 0.05

SendBatch = Callable[[scoring_pb2.OutcomeBatch], Awaitable[int]]


class OutcomeBuffer:
    """Outcomes waiting to be sent: bounded, oldest dropped first. Pure; no I/O."""

    def __init__(self, max_pending: int = 10_000, max_batch: int = 512) -> None:
        self.max_batch = max_batch
        self._pending: deque[scoring_pb2.Outcome] = deque(maxlen=max_pending)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, outcome: scoring_pb2.Outcome) -> None:
        if len(self._pending) == self._pending.maxlen:
            self.dropped += 1
        self._pending.append(outcome)

    def clear(self) -> int:
        """Forget every pending outcome; returns how many there were."""
        count = len(self._pending)
        self._pending.clear()
        return count

    def take_batch(self) -> scoring_pb2.OutcomeBatch | None:
        """Up to `max_batch` of the oldest outcomes, or None when nothing is pending."""
        if not self._pending:
            return None
        count = min(len(self._pending), self.max_batch)
        popleft = self._pending.popleft
        return scoring_pb2.OutcomeBatch(outcomes=[popleft() for _ in range(count)])


class OutcomeReporter:
    """Background task that drains an `OutcomeBuffer` into `send` (the agent's ReportOutcome).

    `linger_s` lets a batch gather after the first outcome wakes the task; `on_dropped` is told
    how many outcomes were lost (buffer overflow or a failed send) for the drop metric.
    """

    def __init__(
        self,
        send: SendBatch,
        *,
        linger_s: float = LINGER_S,
        buffer: OutcomeBuffer | None = None,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._send = send
        self.linger_s = linger_s
        self.buffer = buffer if buffer is not None else OutcomeBuffer()
        self._on_dropped = on_dropped
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self._reported_drops = 0
        self.sent = 0

    def report(self, outcome: scoring_pb2.Outcome) -> None:
        """Queue one outcome; returns at once."""
        self.buffer.add(outcome)
        if not self._wakeup.is_set():
            self._wakeup.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="infermesh-router-outcomes"
            )

    async def aclose(self) -> None:
        """Stop the task and try once to send whatever is still pending."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while (batch := self.buffer.take_batch()) is not None:
            if not await self._send_batch(batch):
                self._count_dropped(self.buffer.clear())
                break

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.linger_s > 0:
                await asyncio.sleep(self.linger_s)
            while (batch := self.buffer.take_batch()) is not None:
                await self._send_batch(batch)

    async def _send_batch(self, batch: scoring_pb2.OutcomeBatch) -> bool:
        try:
            await self._send(batch)
        except Exception as exc:
            self._count_dropped(len(batch.outcomes))
            if not self._failing:
                log.warning("outcome reports dropped", error=str(exc), outcomes=len(batch.outcomes))
                self._failing = True
            return False
        if self._failing:
            log.info("outcome reports are reaching the agent again")
            self._failing = False
        self.sent += len(batch.outcomes)
        self._count_dropped(0)
        return True

    def _count_dropped(self, lost: int) -> None:
        overflow = self.buffer.dropped - self._reported_drops
        self._reported_drops = self.buffer.dropped
        total = lost + overflow
        if total and self._on_dropped is not None:
            self._on_dropped(total)

"""Outcome reporting: batched, bounded, and never failing the caller."""

from __future__ import annotations

import asyncio

import pytest

from infermesh.core.proto import scoring_pb2
from infermesh.router.outcomes import OutcomeBuffer, OutcomeReporter


def outcome(n: int) -> scoring_pb2.Outcome:
    return scoring_pb2.Outcome(target_id=f"t{n}", ok=True, status=200)


def test_buffer_hands_out_oldest_first_in_bounded_batches() -> None:
    buffer = OutcomeBuffer(max_pending=100, max_batch=3)
    for n in range(5):
        buffer.add(outcome(n))
    first = buffer.take_batch()
    second = buffer.take_batch()
    assert first is not None
    assert second is not None
    assert [o.target_id for o in first.outcomes] == ["t0", "t1", "t2"]
    assert [o.target_id for o in second.outcomes] == ["t3", "t4"]
    assert buffer.take_batch() is None


def test_buffer_drops_the_oldest_when_full_and_counts_it() -> None:
    buffer = OutcomeBuffer(max_pending=2)
    for n in range(3):
        buffer.add(outcome(n))
    batch = buffer.take_batch()
    assert batch is not None
    assert [o.target_id for o in batch.outcomes] == ["t1", "t2"]
    assert buffer.dropped == 1


@pytest.mark.anyio
async def test_outcomes_reported_together_arrive_in_one_batch() -> None:
    batches: list[list[str]] = []
    arrived = asyncio.Event()

    async def send(batch: scoring_pb2.OutcomeBatch) -> int:
        batches.append([o.target_id for o in batch.outcomes])
        arrived.set()
        return len(batch.outcomes)

    reporter = OutcomeReporter(send, linger_s=0.0)
    reporter.start()
    for n in range(3):
        reporter.report(outcome(n))
    async with asyncio.timeout(5):
        await arrived.wait()
    await reporter.aclose()
    assert batches == [["t0", "t1", "t2"]]
    assert reporter.sent == 3


@pytest.mark.anyio
async def test_a_failing_agent_drops_outcomes_and_counts_them() -> None:
    dropped: list[int] = []

    async def send(batch: scoring_pb2.OutcomeBatch) -> int:
        raise ConnectionError("agent is down")

    reporter = OutcomeReporter(send, linger_s=0.0, on_dropped=dropped.append)
    reporter.report(outcome(1))
    reporter.report(outcome(2))
    await reporter.aclose()
    assert sum(dropped) == 2

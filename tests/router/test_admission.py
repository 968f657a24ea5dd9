"""Admission queues by SLO class, on a fake clock: limits, priority, FIFO, bounds, deadlines."""

from __future__ import annotations

import pytest

from infermesh.core.model import SloClass
from infermesh.router.admission import (
    KEEP_MODELS,
    AdmissionQueues,
    ClassLimits,
    Queued,
    Refusal,
    Ticket,
    WaiterState,
)

LATENCY, STANDARD, BATCH = SloClass.LATENCY, SloClass.STANDARD, SloClass.BATCH
MODEL = "llama"


def queues(
    max_concurrent: int = 10, max_queue: int = 10, wait_s: float = 5.0, model_limit: int = 100
) -> AdmissionQueues:
    limits = ClassLimits(max_concurrent, max_queue, wait_s)
    return AdmissionQueues(lambda model, slo: limits, model_limit)


def ticket(verdict: Ticket | Queued | Refusal) -> Ticket:
    assert isinstance(verdict, Ticket), verdict
    return verdict


def queued(verdict: Ticket | Queued | Refusal) -> Queued:
    assert isinstance(verdict, Queued), verdict
    return verdict


def test_request_runs_at_once_while_its_class_has_a_free_slot() -> None:
    gate = queues(max_concurrent=2)
    ticket(gate.arrive(MODEL, STANDARD, 0.0))
    ticket(gate.arrive(MODEL, STANDARD, 0.0))
    assert gate.in_flight(MODEL, STANDARD) == 2
    queued(gate.arrive(MODEL, STANDARD, 0.0))
    assert gate.queued(MODEL, STANDARD) == 1


def test_a_queued_request_gets_the_slot_freed_by_a_finished_one_and_knows_its_wait() -> None:
    gate = queues(max_concurrent=1)
    running = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    waiting = queued(gate.arrive(MODEL, STANDARD, 1.0)).waiter
    admitted = gate.release(running, 3.0)
    assert admitted == [waiting]
    assert waiting.state is WaiterState.ADMITTED
    assert waiting.ticket is not None
    assert waiting.ticket.queued_s == pytest.approx(2.0)
    assert gate.in_flight(MODEL, STANDARD) == 1
    assert gate.queued(MODEL, STANDARD) == 0


def test_a_freed_slot_goes_to_latency_before_standard_before_batch() -> None:
    gate = queues(model_limit=1)
    running = ticket(gate.arrive(MODEL, BATCH, 0.0))
    batch = queued(gate.arrive(MODEL, BATCH, 1.0)).waiter
    standard = queued(gate.arrive(MODEL, STANDARD, 2.0)).waiter
    latency = queued(gate.arrive(MODEL, LATENCY, 3.0)).waiter

    order = []
    holder = running
    for now in (4.0, 5.0, 6.0):
        [admitted] = gate.release(holder, now)
        order.append(admitted.slo_class)
        assert admitted.ticket is not None
        holder = admitted.ticket
    assert order == [LATENCY, STANDARD, BATCH]
    assert [w.state for w in (latency, standard, batch)] == [WaiterState.ADMITTED] * 3


def test_requests_of_one_class_are_admitted_first_in_first_out() -> None:
    gate = queues(max_concurrent=1)
    holder = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    waiters = [queued(gate.arrive(MODEL, STANDARD, float(i))).waiter for i in range(1, 4)]
    admitted = []
    for now in (5.0, 6.0, 7.0):
        [first] = gate.release(holder, now)
        admitted.append(first)
        assert first.ticket is not None
        holder = first.ticket
    assert admitted == waiters


def test_a_class_at_its_own_limit_does_not_hold_up_another_class() -> None:
    limits = {
        BATCH: ClassLimits(1, 10, 30.0),
        LATENCY: ClassLimits(10, 10, 1.0),
        STANDARD: ClassLimits(10, 10, 5.0),
    }
    gate = AdmissionQueues(lambda model, slo: limits[slo], 100)
    ticket(gate.arrive(MODEL, BATCH, 0.0))
    queued(gate.arrive(MODEL, BATCH, 0.0))
    ticket(gate.arrive(MODEL, LATENCY, 0.0))


def test_models_have_separate_slots() -> None:
    gate = queues(max_concurrent=1)
    ticket(gate.arrive("a", STANDARD, 0.0))
    ticket(gate.arrive("b", STANDARD, 0.0))


def test_a_full_queue_refuses_with_a_retry_after_from_how_fast_slots_free() -> None:
    gate = queues(max_concurrent=1, max_queue=2)
    first = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    queued(gate.arrive(MODEL, STANDARD, 0.0))
    queued(gate.arrive(MODEL, STANDARD, 0.0))
    refusal = gate.arrive(MODEL, STANDARD, 0.0)
    assert isinstance(refusal, Refusal)
    assert refusal.reason == "queue_full"
    assert "max_queue 2" in refusal.message
    assert "'llama'" in refusal.message
    assert refusal.retry_after_s >= 1.0
    # Requests that hold their slot 10 s make the next estimate longer.
    [second] = gate.release(first, 10.0)
    assert second.ticket is not None
    gate.release(second.ticket, 20.0)
    queued(gate.arrive(MODEL, STANDARD, 20.0))
    queued(gate.arrive(MODEL, STANDARD, 20.0))
    later = gate.arrive(MODEL, STANDARD, 20.0)
    assert isinstance(later, Refusal)
    assert later.retry_after_s > refusal.retry_after_s


def test_max_queue_zero_refuses_as_soon_as_the_slots_are_taken() -> None:
    gate = queues(max_concurrent=1, max_queue=0)
    ticket(gate.arrive(MODEL, BATCH, 0.0))
    assert isinstance(gate.arrive(MODEL, BATCH, 0.0), Refusal)


def test_a_waiter_past_its_deadline_expires_and_the_others_stay() -> None:
    limits = {slo: ClassLimits(1, 10, 1.0 if slo is LATENCY else 30.0) for slo in SloClass}
    gate = AdmissionQueues(lambda model, slo: limits[slo], 1)
    ticket(gate.arrive(MODEL, BATCH, 0.0))
    latency = queued(gate.arrive(MODEL, LATENCY, 0.0)).waiter
    batch = queued(gate.arrive(MODEL, BATCH, 0.0)).waiter
    assert gate.next_deadline() == 1.0
    assert gate.expire(0.5) == []
    assert gate.expire(1.0) == [latency]
    assert latency.state is WaiterState.EXPIRED
    assert latency.retry_after_s >= 1.0
    assert batch.state is WaiterState.QUEUED
    assert gate.queued(MODEL, LATENCY) == 0
    assert gate.next_deadline() == 30.0


def test_a_waiter_that_leaves_frees_its_place_and_an_admitted_one_its_slot() -> None:
    gate = queues(max_concurrent=1)
    holder = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    leaving = queued(gate.arrive(MODEL, STANDARD, 0.0)).waiter
    staying = queued(gate.arrive(MODEL, STANDARD, 0.0)).waiter
    assert gate.abandon(leaving, 1.0) == []
    assert leaving.state is WaiterState.ABANDONED
    assert gate.release(holder, 2.0) == [staying]
    # Admitted, but its client left before using the slot: the slot is given back.
    gate.abandon(staying, 3.0)
    assert gate.in_flight(MODEL, STANDARD) == 0


def test_releasing_twice_frees_one_slot() -> None:
    gate = queues(max_concurrent=2)
    first = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    ticket(gate.arrive(MODEL, STANDARD, 0.0))
    gate.release(first, 1.0)
    gate.release(first, 1.0)
    assert gate.in_flight(MODEL, STANDARD) == 1


def test_idle_models_are_forgotten_once_many_models_were_seen() -> None:
    gate = queues(max_concurrent=1)
    holder = ticket(gate.arrive(MODEL, STANDARD, 0.0))
    assert list(gate.levels()) != []
    gate.release(holder, 1.0)
    assert list(gate.levels()) == []
    for index in range(KEEP_MODELS * 2):
        gate.release(ticket(gate.arrive(f"model-{index}", STANDARD, 2.0)), 2.0)
    assert gate.tracked_models() <= KEEP_MODELS


def test_raised_limits_admit_waiters_on_pump() -> None:
    current = {"limit": 1}
    gate = AdmissionQueues(lambda model, slo: ClassLimits(current["limit"], 10, 5.0), 100)
    ticket(gate.arrive(MODEL, STANDARD, 0.0))
    waiter = queued(gate.arrive(MODEL, STANDARD, 0.0)).waiter
    assert gate.pump(1.0) == []
    current["limit"] = 2
    assert gate.pump(1.0) == [waiter]


def test_a_model_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="model_limit must be >= 1"):
        queues(model_limit=0)

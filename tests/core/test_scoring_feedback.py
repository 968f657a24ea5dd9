"""Feedback between scrapes: reservations correct telemetry that is up to one scrape old.

In both directions: requests sent after (or shortly before) the scrape that it does not show
count as load, and requests it still counts that have finished since no longer do, until
telemetry read after they finished arrives. All times are virtual (fake clocks).
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import TargetView
from infermesh.core.model import ModelState, ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.scoring.engine import RankedTarget, ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker, runtime_ran
from infermesh.core.scoring.prefix import LearningScorer
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

SCRAPE = 1_000.0
"""When the telemetry in these tests was read."""
MODEL = "llama"
PREFIX = 0x5EED


def key(name: str) -> TargetKey:
    return TargetKey(model=MODEL, node=name, endpoint=f"http://{name}:8000")


# --------------------------------------------------------------------------- the tracker


def test_a_request_finished_after_the_scrape_counts_until_newer_telemetry() -> None:
    tracker = InflightTracker(id_prefix="t")
    reservation = tracker.reserve("a", now=SCRAPE - 0.5)  # running when the scrape was read
    tracker.release(reservation.reservation_id, finished_at=SCRAPE + 0.3)
    assert tracker.finished_unseen("a", since=SCRAPE) == 1
    assert tracker.finished_unseen("a", since=SCRAPE + 0.2) == 1  # a scrape before the finish
    assert tracker.finished_unseen("a", since=SCRAPE + 0.3) == 0  # read after it finished
    assert tracker.finished_unseen("b", since=SCRAPE) == 0


def test_a_request_both_started_and_finished_after_the_scrape_was_never_counted() -> None:
    tracker = InflightTracker(id_prefix="t")
    reservation = tracker.reserve("a", now=SCRAPE + 0.1)
    assert tracker.in_flight("a", since=SCRAPE) == 1
    tracker.release(reservation.reservation_id, finished_at=SCRAPE + 0.4)
    assert tracker.in_flight("a", since=SCRAPE) == 0
    assert tracker.finished_unseen("a", since=SCRAPE) == 0
    # telemetry read while it ran did count it
    assert tracker.finished_unseen("a", since=SCRAPE + 0.2) == 1


def test_without_a_finish_time_the_latest_known_time_stands_in() -> None:
    tracker = InflightTracker(id_prefix="t")
    reservation = tracker.reserve("a", now=SCRAPE - 1.0)
    tracker.expire(now=SCRAPE + 0.5)  # the last time the tracker was given
    tracker.release(reservation.reservation_id)
    assert tracker.finished_unseen("a", since=SCRAPE) == 1
    assert tracker.finished_unseen("a", since=SCRAPE + 0.5) == 0


def test_a_finish_time_is_never_before_the_start() -> None:
    tracker = InflightTracker(id_prefix="t")
    reservation = tracker.reserve("a", now=SCRAPE + 0.1)
    tracker.release(reservation.reservation_id, finished_at=SCRAPE - 5.0)
    assert tracker.finished_unseen("a", since=SCRAPE) == 0
    assert tracker.finished_unseen("a", since=SCRAPE + 0.1) == 0


def test_requests_the_runtime_never_ran_leave_nothing_to_correct() -> None:
    tracker = InflightTracker(id_prefix="t")
    refused = tracker.reserve("a", now=SCRAPE - 0.5)
    tracker.release(refused.reservation_id, finished_at=SCRAPE + 0.3, ran=False)
    assert tracker.finished_unseen("a", since=SCRAPE) == 0


@pytest.mark.parametrize(
    ("status", "ran"),
    [(200, True), (499, True), (0, False), (400, False), (429, False), (503, False)],
)
def test_only_answered_requests_count_as_having_run(status: int, ran: bool) -> None:
    assert runtime_ran(status) is ran


def test_an_outcome_dates_the_finish_from_the_measured_latency() -> None:
    tracker = InflightTracker(id_prefix="t")
    early = tracker.reserve("a", now=SCRAPE - 0.5)
    late = tracker.reserve("a", now=SCRAPE - 0.5)
    # reported 0.6 s late in one batch: finished at start + latency, not when reported
    tracker.release_outcome(early.reservation_id, SCRAPE + 0.6, status=200, latency_s=0.6)
    tracker.release_outcome(late.reservation_id, SCRAPE + 0.6, status=200, latency_s=1.5)
    assert tracker.finished_unseen("a", since=SCRAPE) == 2
    assert tracker.finished_unseen("a", since=SCRAPE + 0.1) == 1  # the early one is seen gone
    assert tracker.finished_unseen("a", since=SCRAPE + 0.5) == 1
    assert tracker.finished_unseen("a", since=SCRAPE + 0.6) == 0  # capped at the report time


def test_an_outcome_without_latency_is_dated_when_reported_and_a_refusal_is_not() -> None:
    tracker = InflightTracker(id_prefix="t")
    unknown = tracker.reserve("a", now=SCRAPE - 0.5)
    refused = tracker.reserve("a", now=SCRAPE - 0.5)
    assert tracker.release_outcome(unknown.reservation_id, SCRAPE + 0.2, status=200) == unknown
    assert tracker.release_outcome(refused.reservation_id, SCRAPE + 0.2, status=503) == refused
    assert tracker.release_outcome(refused.reservation_id, SCRAPE + 0.2, status=200) is None
    assert tracker.finished_unseen("a", since=SCRAPE + 0.1) == 1
    assert tracker.open_count("a") == 0


def test_expired_reservations_never_count_as_finished_and_old_finishes_are_forgotten() -> None:
    tracker = InflightTracker(ttl_s=600.0, id_prefix="t")
    lost = tracker.reserve("a", now=0.0)
    done = tracker.reserve("b", now=0.0)
    tracker.release(done.reservation_id, finished_at=1.0)
    assert tracker.expire(now=700.0) == 1
    assert tracker.get(lost.reservation_id) is None
    assert tracker.finished_unseen("a", since=0.5) == 0
    assert tracker.finished_unseen("b", since=0.5) == 0  # older than the TTL: forgotten


def test_open_reservations_shortly_before_the_scrape_are_counted_within_a_window() -> None:
    tracker = InflightTracker(id_prefix="t")
    tracker.reserve("a", now=SCRAPE - 10.0)  # long ago: the scrape surely shows it (or it leaked)
    tracker.reserve("a", now=SCRAPE - 0.2)
    tracker.reserve("a", now=SCRAPE - 0.05)
    tracker.reserve("a", now=SCRAPE + 0.1)  # after the scrape: in flight instead
    assert tracker.open_before("a", since=SCRAPE, window_s=5.0) == 2
    assert tracker.open_before("a", since=SCRAPE, window_s=0.1) == 1
    assert tracker.open_before("a", since=SCRAPE - 20.0, window_s=5.0) == 0
    assert tracker.open_before("b", since=SCRAPE, window_s=5.0) == 0
    assert tracker.in_flight("a", since=SCRAPE) == 1


# --------------------------------------------------------------------------- the view


def state(**changes: Any) -> ModelState:
    changes.setdefault("e2e_s", 2.0)
    return ModelState(key=key("a"), last_updated=SCRAPE, **changes)


@pytest.mark.parametrize(
    ("running", "waiting", "finished", "expected_running", "expected_waiting"),
    [
        (4, 3, 2, 4, 1),  # a queue: finished slots went to queued requests
        (4, 1, 3, 2, 0),  # the queue is used up, then running drops
        (1, 0, 1, 0, 0),  # the one request finished
        (1, 0, 3, 0, 0),  # never below zero
        (3, 2, 0, 3, 2),  # nothing finished
    ],
)
def test_finished_requests_come_off_the_queue_first_then_off_running(
    running: float, waiting: float, finished: int, expected_running: float, expected_waiting: float
) -> None:
    view = TargetView(state(running=running, waiting=waiting), finished_unseen=finished)
    assert (view.running, view.waiting) == (expected_running, expected_waiting)
    assert view.load == expected_running + expected_waiting


@pytest.mark.parametrize(
    ("running", "waiting", "in_flight", "finished", "open_before"),
    [(4, 3, 1, 2, 0), (4, 1, 0, 3, 0), (1, 0, 2, 1, 0), (2, 0, 0, 5, 0), (1, 0, 1, 0, 4)],
)
def test_expected_work_left_is_the_state_formula_over_the_corrected_load(
    running: float, waiting: float, in_flight: int, finished: int, open_before: int
) -> None:
    view = TargetView(
        state(running=running, waiting=waiting),
        in_flight=in_flight,
        finished_unseen=finished,
        open_before_scrape=open_before,
    )
    corrected = attrs.evolve(view.state, running=view.running, waiting=view.waiting)
    assert view.expected_work_left_s == pytest.approx(
        corrected.work_left_with_s(extra_queued=view.unseen)
    )


def test_requests_sent_before_the_scrape_that_it_does_not_show_are_unseen_load() -> None:
    # 5 reservations opened just before the scrape; it shows only 2 of them so far
    view = TargetView(state(running=2), in_flight=1, open_before_scrape=5)
    assert view.unseen == 1 + 3
    assert view.load == 2 + 4
    # a runtime busy with other traffic shows them all: nothing is added
    busy = TargetView(state(running=8), in_flight=1, open_before_scrape=5)
    assert (busy.unseen, busy.load) == (1, 9)


# --------------------------------------------------------------------------- the engine


class Mesh:
    """Three idle replicas behind one engine with the built-in scorers, in virtual time."""

    def __init__(self, **scoring: Any) -> None:
        self.store = StateStore()
        self.inflight = InflightTracker(id_prefix="t")
        self.engine = ScoringEngine.from_config(
            self.store,
            self.inflight,
            {s.name: s for s in builtin_scorers()},
            ScoringConfig(**scoring),
        )
        self.versions: dict[TargetKey, int] = {}
        self.names = ("a", "b", "c")
        for name in self.names:
            self.scrape(name, SCRAPE)
        # PREFIX was last sent to b (not the replica the id tie-break would pick)
        self.home = "b"
        for ws in self.engine.scorers:
            if isinstance(ws.scorer, LearningScorer):
                features = RequestFeatures(model=MODEL, prefix_key=PREFIX)
                ws.scorer.learn(features, key(self.home).target_id, SCRAPE)

    def scrape(self, name: str, at: float, **changes: Any) -> None:
        target = key(name)
        version = self.versions[target] = self.versions.get(target, 0) + 1
        changes.setdefault("running", 0.0)
        changes.setdefault("e2e_s", 0.5)
        self.store.apply_model_delta(
            ModelStateDelta(target, version, {"last_updated": at, **changes})
        )

    def best(self, now: float) -> RankedTarget:
        return self.engine.rank(RequestFeatures(model=MODEL, prefix_key=PREFIX), now).targets[0]

    def view(self, name: str, now: float) -> TargetView:
        state = self.store.get_target(key(name).target_id)
        assert state is not None
        return self.engine.view(state, now)


def reason(target: RankedTarget, scorer: str) -> str:
    return next(r.reason for r in target.reasons if r.scorer == scorer)


def test_sequential_requests_with_one_prefix_stay_home_after_each_finishes() -> None:
    # Pure bounded load (no minimum capacity), so only the finished correction keeps it home.
    mesh = Mesh(prefix_min_capacity=0)
    now = SCRAPE + 0.01
    for _ in range(6):
        first = mesh.best(now)
        assert first.view.key.node == mesh.home
        reservation = mesh.inflight.reserve(first.target_id, now)
        # the scrape reads it running, then it finishes and its outcome arrives
        mesh.scrape(mesh.home, now + 0.05, running=1.0)
        mesh.inflight.release_outcome(
            reservation.reservation_id, now + 0.2, status=200, latency_s=0.1
        )
        now += 0.25
        assert mesh.view(mesh.home, now).load == 0
    after = mesh.best(now)
    assert "1 finished since" in reason(after, "queue")
    assert "sent here recently" in reason(after, "prefix")


def test_without_the_outcome_the_stale_running_count_spills_the_prefix() -> None:
    # The failure the correction fixes: the scrape still counts the finished request.
    mesh = Mesh(prefix_min_capacity=0)
    mesh.inflight.reserve(key(mesh.home).target_id, SCRAPE - 0.1)
    mesh.scrape(mesh.home, SCRAPE + 0.05, running=1.0)
    assert mesh.best(SCRAPE + 0.2).view.key.node != mesh.home


def test_the_correction_ends_when_telemetry_newer_than_the_finish_arrives() -> None:
    mesh = Mesh()
    reservation = mesh.inflight.reserve(key("a").target_id, SCRAPE - 0.1)
    mesh.scrape("a", SCRAPE + 0.05, running=3.0)  # the request and two others
    mesh.inflight.release(reservation.reservation_id, finished_at=SCRAPE + 0.1)
    view = mesh.view("a", SCRAPE + 0.15)
    assert (view.finished_unseen, view.running, view.load) == (1, 2.0, 2.0)
    mesh.scrape("a", SCRAPE + 0.3, running=2.0)  # read after it finished: it is gone there
    view = mesh.view("a", SCRAPE + 0.35)
    assert (view.finished_unseen, view.running, view.load) == (0, 2.0, 2.0)


def test_requests_reserved_before_the_scrape_but_not_yet_arrived_still_count() -> None:
    mesh = Mesh()
    for _ in range(5):
        mesh.inflight.reserve(key("a").target_id, SCRAPE - 0.05)
    mesh.scrape("a", SCRAPE, running=2.0)  # only two had reached the runtime
    view = mesh.view("a", SCRAPE + 0.01)
    assert (view.in_flight, view.unseen, view.load) == (0, 3, 5)
    best = mesh.engine.rank(RequestFeatures(model=MODEL), SCRAPE + 0.01).targets
    by_node = {t.view.key.node: t for t in best}
    assert "3 sent before it not counted yet" in reason(by_node["a"], "queue")
    assert best[-1].view.key.node == "a"

"""In-flight reservations (counted only after telemetry, expired by TTL) and outcome EWMAs."""

from __future__ import annotations

import pytest

from infermesh.core.scoring.inflight import InflightTracker, is_target_error


def test_only_reservations_started_after_the_telemetry_count_as_in_flight() -> None:
    tracker = InflightTracker(id_prefix="t")
    tracker.reserve("a", now=10.0)
    tracker.reserve("a", now=12.0)
    tracker.reserve("b", now=12.0)
    assert tracker.in_flight("a", since=11.0) == 1
    assert tracker.in_flight("a", since=9.0) == 2
    assert tracker.in_flight("a", since=12.0) == 0
    assert tracker.open_count("a") == 2


def test_release_closes_a_reservation_once() -> None:
    tracker = InflightTracker(id_prefix="t")
    reservation = tracker.reserve("a", now=1.0)
    assert reservation.reservation_id == "t-1"
    released = tracker.release(reservation.reservation_id)
    assert released == reservation
    assert tracker.release(reservation.reservation_id) is None
    assert tracker.in_flight("a", since=0.0) == 0


def test_reservations_expire_after_their_ttl() -> None:
    tracker = InflightTracker(ttl_s=600.0)
    old = tracker.reserve("a", now=0.0)
    tracker.reserve("a", now=500.0)
    assert tracker.expire(now=599.0) == 0
    assert tracker.expire(now=601.0) == 1
    assert tracker.get(old.reservation_id) is None
    assert tracker.in_flight("a", since=-1.0) == 1
    assert tracker.expired_total == 1
    # reserving also expires: a dead router cannot leak slots even if nobody calls expire()
    tracker.reserve("b", now=1200.0)
    assert tracker.open_count() == 1


def test_outcomes_feed_ttft_and_error_rate_ewmas() -> None:
    tracker = InflightTracker(ewma_alpha=0.5)
    tracker.record_outcome("a", ok=True, status=200, ttft_s=0.2)
    tracker.record_outcome("a", ok=True, status=200, ttft_s=0.4)
    tracker.record_outcome("a", ok=False, status=503, ttft_s=None)
    stats = tracker.stats("a")
    assert stats is not None
    assert stats.ttft_ewma_s == pytest.approx(0.3)
    assert stats.error_rate == pytest.approx(0.5)
    assert stats.outcomes == 3
    assert tracker.stats("b") is None


def test_client_errors_do_not_count_against_the_target() -> None:
    assert not is_target_error(ok=False, status=400)
    assert is_target_error(ok=False, status=429)
    assert is_target_error(ok=False, status=502)
    assert is_target_error(ok=False, status=0)
    assert not is_target_error(ok=True, status=200)


def test_bad_tracker_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="TTL must be positive"):
        InflightTracker(ttl_s=0)
    with pytest.raises(ValueError, match="alpha"):
        InflightTracker(ewma_alpha=1.5)

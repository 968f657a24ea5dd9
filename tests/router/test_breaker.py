"""Per-target circuit breaking with a fake clock: ejection, back-off, half-open probe."""

from __future__ import annotations

from infermesh.core.config import BreakerConfig
from infermesh.router.breaker import CLOSED, HALF_OPEN, OPEN, Breakers


def breakers(**overrides: object) -> tuple[Breakers, list[tuple[str, str]]]:
    moves: list[tuple[str, str]] = []
    config = BreakerConfig(**overrides)  # type: ignore[arg-type]
    return Breakers(config, on_transition=lambda t, s: moves.append((t, s))), moves


def test_consecutive_failures_eject_then_one_probe_closes_it() -> None:
    b, moves = breakers(consecutive_failures=3, ejection_s=5.0)
    for _ in range(2):
        b.record("t", False, now=0.0)
    assert b.available("t", 0.0)
    b.record("t", False, now=1.0)
    assert b.state("t", 1.0) == OPEN
    assert not b.available("t", 5.9)
    assert b.available("t", 6.0)  # half-open
    b.acquire("t", 6.0)
    assert not b.available("t", 6.1)  # one probe at a time
    b.record("t", True, now=6.2)
    assert b.state("t", 6.2) == CLOSED
    assert moves == [("t", OPEN), ("t", HALF_OPEN), ("t", CLOSED)]


def test_a_failed_probe_ejects_again_for_twice_as_long_up_to_the_cap() -> None:
    b, _ = breakers(consecutive_failures=1, ejection_s=1.0, max_ejection_s=3.0)
    b.record("t", False, now=0.0)  # open until 1
    b.acquire("t", 1.0)
    b.record("t", False, now=1.0)  # open until 3
    assert not b.available("t", 2.9)
    b.acquire("t", 3.0)
    b.record("t", False, now=3.0)  # 4 s capped to 3: open until 6
    assert not b.available("t", 5.9)
    assert b.available("t", 6.0)


def test_a_failure_rate_over_the_window_ejects() -> None:
    b, _ = breakers(consecutive_failures=100, failure_rate=0.5, window=10, min_requests=10)
    for i in range(9):
        b.record("t", i % 2 == 0, now=0.0)  # 4 failures of 9: too few requests yet
    assert b.state("t", 0.0) == CLOSED
    b.record("t", False, now=0.0)  # 5 of 10
    assert b.state("t", 0.0) == OPEN


def test_successes_reset_the_consecutive_count() -> None:
    c, _ = breakers(consecutive_failures=2, min_requests=100)
    for _ in range(5):
        c.record("t", False, now=0.0)
        c.record("t", True, now=0.0)
    assert c.state("t", 0.0) == CLOSED


def test_a_cancelled_probe_frees_the_half_open_slot() -> None:
    b, _ = breakers(consecutive_failures=1, ejection_s=1.0)
    b.record("t", False, now=0.0)
    b.acquire("t", 1.0)
    assert not b.available("t", 1.0)
    b.release("t")
    assert b.available("t", 1.0)


def test_disabled_breakers_never_eject() -> None:
    b, moves = breakers(enabled=False, consecutive_failures=1)
    for _ in range(10):
        b.record("t", False, now=0.0)
    assert b.available("t", 0.0)
    assert moves == []

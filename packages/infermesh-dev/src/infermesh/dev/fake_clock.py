"""A deterministic clock for tests: pass it wherever InferMesh code takes `clock=`.

Adapters (`VllmAdapter(context, clock=...)`), the agent's metrics and journals read the time
through a `Callable[[], float]` of Unix seconds; a FakeClock returns a fixed time that moves only
when the test says so (`advance`) or by a fixed step per reading (`step_s`), so rates and ages
computed from it are exact.
"""

from __future__ import annotations

__all__ = ["DEFAULT_START", "FakeClock"]

DEFAULT_START = 1_700_000_000.0
"""2023-11-14T22:13:20Z: a realistic Unix time, far from 0 so `now - 0` is never mistaken for
an age."""


class FakeClock:
    """`clock()` returns the current fake Unix time, then moves it on by `step_s`."""

    def __init__(self, start: float = DEFAULT_START, step_s: float = 0.0) -> None:
        if step_s < 0:
            raise ValueError(f"step_s must be >= 0 (a clock does not run backwards), got {step_s}")
        self.now = float(start)
        self.step_s = float(step_s)
        self.readings = 0
        """How many times the clock has been read."""

    def __call__(self) -> float:
        now = self.now
        self.now += self.step_s
        self.readings += 1
        return now

    def advance(self, seconds: float) -> float:
        """Move the time on by `seconds` (>= 0); returns the new time."""
        if seconds < 0:
            raise ValueError(f"cannot advance a clock by {seconds} s (a negative time)")
        self.now += seconds
        return self.now

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r}, step_s={self.step_s!r})"

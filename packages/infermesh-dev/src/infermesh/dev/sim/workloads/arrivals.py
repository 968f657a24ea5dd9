"""Open-loop arrival processes in virtual time: Poisson and a bursty two-state MMPP.

Pure functions of a `random.Random` and their parameters; they never read a clock and yield
arrival times in increasing order, lazily, so a long run never holds its whole schedule.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

__all__ = ["mmpp_arrivals", "poisson_arrivals"]


def _check(rate: float, duration_s: float) -> None:
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")


def poisson_arrivals(rng: random.Random, rate: float, duration_s: float) -> Iterator[float]:
    """Arrival times of a Poisson process of `rate` per second on [0, duration_s)."""
    _check(rate, duration_s)
    now = rng.expovariate(rate)
    while now < duration_s:
        yield now
        now += rng.expovariate(rate)


def mmpp_arrivals(
    rng: random.Random,
    rate: float,
    duration_s: float,
    *,
    burst_factor: float = 4.0,
    mean_calm_s: float = 8.0,
    mean_burst_s: float = 2.0,
) -> Iterator[float]:
    """Arrivals of a two-state Markov-modulated Poisson process whose long-run mean is `rate`.

    The process alternates calm and burst periods (exponential lengths with the given means); a
    burst arrives `burst_factor` times faster than calm. The calm rate is solved so that the
    time-weighted mean over both states equals `rate`, so sweeps stay comparable with Poisson.
    """
    _check(rate, duration_s)
    if burst_factor < 1:
        raise ValueError(f"burst_factor must be >= 1, got {burst_factor}")
    if mean_calm_s <= 0 or mean_burst_s <= 0:
        raise ValueError("mean_calm_s and mean_burst_s must be > 0")
    burst_share = mean_burst_s / (mean_calm_s + mean_burst_s)
    calm_rate = rate / ((1.0 - burst_share) + burst_factor * burst_share)
    # Start in the stationary distribution so short runs are not biased towards calm.
    bursting = rng.random() < burst_share
    now = 0.0
    while now < duration_s:
        state_rate = calm_rate * burst_factor if bursting else calm_rate
        state_end = now + rng.expovariate(1.0 / (mean_burst_s if bursting else mean_calm_s))
        # Memorylessness: restarting the gap at a state change keeps the process exact.
        now += rng.expovariate(state_rate)
        while now < state_end and now < duration_s:
            yield now
            now += rng.expovariate(state_rate)
        now = state_end
        bursting = not bursting

"""Lifeguard's local health score: how far this node distrusts its own timing.

A bounded counter. Missed nacks, failed probes and suspicions of ourselves raise it; direct acks
lower it; it stretches the probe interval and timeout. It never reads a clock.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """Score 0 (healthy) .. `max_multiplier` - 1; timings are multiplied by score + 1."""

    __slots__ = ("_ceiling", "score")

    def __init__(self, max_multiplier: int) -> None:
        self._ceiling = max_multiplier - 1
        self.score = 0

    def adjust(self, delta: int) -> None:
        self.score = min(self._ceiling, max(0, self.score + delta))

    def scaled(self, seconds: float) -> float:
        """`seconds` stretched by how unhealthy this node thinks it is."""
        return seconds * (self.score + 1)

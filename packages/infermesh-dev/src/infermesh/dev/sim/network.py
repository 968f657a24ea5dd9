"""The simulated network: one-way latency with jitter, and uniform random loss per message.

A pure model: it draws from the random generator it is given and never keeps time itself.
"""

from __future__ import annotations

import random

import attrs

__all__ = ["PROFILES", "NetworkModel", "NetworkProfile"]

# Linux's minimum TCP retransmission timeout: what a lost segment of a stream message costs.
TCP_MIN_RTO_S = 0.2


@attrs.frozen
class NetworkProfile:
    """Default one-way latency and jitter of a network kind (the SWIM profile has the same name)."""

    latency_s: float
    jitter_s: float


PROFILES = {
    # One datacenter: ~0.5 ms round trips.
    "lan": NetworkProfile(latency_s=0.000_25, jitter_s=0.000_1),
    # Regions apart: ~80 ms round trips.
    "wan": NetworkProfile(latency_s=0.040, jitter_s=0.010),
}


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"NetworkModel.{attribute.name} must be in [0, 1), got {value!r}")


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"NetworkModel.{attribute.name} must be >= 0, got {value!r}")


@attrs.frozen
class NetworkModel:
    """Every datagram is lost with probability `loss`, else arrives after latency +/- jitter.

    Stream messages (push-pull and TCP fallback pings) are never lost: they arrive after a
    connection handshake (one round trip) plus the one-way trip, and each lost segment adds one
    minimum retransmission timeout. A reply on the same connection (the ack of a TCP ping) takes
    the one-way trip, plus the same retransmission timeouts.
    """

    latency_s: float = attrs.field(validator=_non_negative)
    jitter_s: float = attrs.field(validator=_non_negative)
    loss: float = attrs.field(default=0.0, validator=_fraction)

    def datagram_delay_s(self, rng: random.Random) -> float | None:
        """When a datagram sent now arrives, relative to now; None if it is lost."""
        if self.loss and rng.random() < self.loss:
            return None
        return self._one_way_s(rng)

    def stream_delay_s(self, rng: random.Random) -> float:
        """When a stream message sent now on a new connection is delivered in full."""
        return 2 * self._one_way_s(rng) + self.stream_reply_delay_s(rng)

    def stream_reply_delay_s(self, rng: random.Random) -> float:
        """When a reply sent now on an open connection is delivered in full."""
        delay_s = self._one_way_s(rng)
        while self.loss and rng.random() < self.loss:
            delay_s += TCP_MIN_RTO_S
        return delay_s

    def _one_way_s(self, rng: random.Random) -> float:
        if not self.jitter_s:
            return self.latency_s
        return max(0.0, self.latency_s + rng.uniform(-self.jitter_s, self.jitter_s))

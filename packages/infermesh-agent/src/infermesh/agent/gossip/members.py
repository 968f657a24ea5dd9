"""Member records for SWIM: state, incarnation, and Lifeguard's dynamic suspicion timer.

Pure values and arithmetic on `now` passed in; never reads a clock or sends anything.
"""

from __future__ import annotations

import enum
import math

import attrs

__all__ = ["Member", "MemberEvent", "MemberState", "Suspicion", "suspicion_min_timeout_s"]


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@attrs.define
class Member:
    """What this node believes about one member; `state_since_s` is when that belief began."""

    member_id: str
    incarnation: int
    state: MemberState
    state_since_s: float
    address: str = ""
    meta: bytes = b""

    @property
    def is_gone(self) -> bool:
        return self.state in (MemberState.DEAD, MemberState.LEFT)


@attrs.frozen
class MemberEvent:
    """A change of a member's state as seen by this node (joined = first seen alive)."""

    kind: str  # "joined" | "alive" | "suspect" | "dead" | "left" | "updated" (address or meta)
    member_id: str
    incarnation: int
    at_s: float


def suspicion_min_timeout_s(
    suspicion_mult: float, cluster_size: int, probe_interval_s: float
) -> float:
    """memberlist's suspicionTimeout: SuspicionMult x max(1, log10 N) x ProbeInterval."""
    node_scale = max(1.0, math.log10(max(1, cluster_size)))
    return suspicion_mult * node_scale * probe_interval_s


@attrs.define
class Suspicion:
    """Lifeguard dynamic suspicion: starts at `max_timeout_s` and shrinks toward `min_timeout_s`.

    Each independent confirmation (a distinct accuser other than the first one), up to
    `expected_confirmations`, shortens the timeout by log(c + 1) / log(k + 1) of the gap.
    """

    incarnation: int
    started_s: float
    min_timeout_s: float
    max_timeout_s: float
    expected_confirmations: int
    first_accuser: str
    confirmers: set[str] = attrs.field(factory=set)

    def confirm(self, accuser: str) -> bool:
        """Count `accuser` as a new independent confirmation; False if it adds nothing."""
        if accuser == self.first_accuser or accuser in self.confirmers:
            return False
        if len(self.confirmers) >= self.expected_confirmations:
            return False
        self.confirmers.add(accuser)
        return True

    @property
    def timeout_s(self) -> float:
        if self.expected_confirmations < 1:
            return self.min_timeout_s
        fraction = math.log(len(self.confirmers) + 1) / math.log(self.expected_confirmations + 1)
        raw_s = self.max_timeout_s - fraction * (self.max_timeout_s - self.min_timeout_s)
        return max(raw_s, self.min_timeout_s)

    @property
    def deadline_s(self) -> float:
        return self.started_s + self.timeout_s

"""What the simulation measures from the member events every node reports.

Bookkeeping only: it is told which node joins and which crashes, reads `MemberEvent`s, and
turns them into spread times, detection latencies and false positives.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import attrs

from infermesh.agent.gossip.members import MemberEvent

__all__ = ["FailureOutcome", "FalsePositives", "JoinOutcome", "Watch", "nearest_rank"]

# "Known cluster-wide": the fraction of live nodes (Serf's convergence figure).
KNOWN_FRACTION = 0.9999


@attrs.frozen
class JoinOutcome:
    """A node joined through `seed_node` at `at_s`; times are seconds after that (None: never)."""

    node: str
    seed_node: str
    at_s: float
    observers: int  # live nodes that should learn of it
    knowing: int  # observers that saw it alive by the end
    known_99_99_s: float | None
    known_all_s: float | None


@attrs.frozen
class FailureOutcome:
    """A node crashed at `at_s`; times are seconds after the crash (None: not within the run)."""

    node: str
    at_s: float
    observers: int  # live nodes that should mark it dead
    marked_dead: int  # observers that did by the end
    first_suspect_s: float | None  # first detection: the first suspicion by anyone
    dead_99_99_s: float | None
    dead_all_s: float | None
    detection_median_s: float | None  # per observer: crash -> it marks the node dead
    detection_p99_s: float | None


@attrs.frozen
class FalsePositives:
    """Suspicions and deaths of members that were alive, counted over the measured window."""

    suspected_members: int  # distinct live members anyone suspected
    suspicions: int  # distinct (member, incarnation) suspicions of live members
    suspect_events: int  # (observer, member) suspect events: each suspicion spreads to many
    dead_members: int  # distinct live members anyone declared dead
    dead_events: int


def nearest_rank(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The value at least `fraction` of the values are at or below (None if that is infinite)."""
    if not sorted_values:
        return None
    position = max(1, math.ceil(fraction * len(sorted_values) - 1e-9))
    value = sorted_values[position - 1]
    return None if math.isinf(value) else value


def _latencies(at_by_observer: dict[int, float], start_s: float, observers: int) -> list[float]:
    known = sorted(at_s - start_s for at_s in at_by_observer.values())
    return known + [math.inf] * (observers - len(known))


class Watch:
    """Reads every node's member events; told the join and the crash before they happen."""

    def __init__(self, ids: Sequence[str]) -> None:
        self._ids = ids
        self._counting = False
        self._joiner: str | None = None
        self._seed = ""
        self._join_s = 0.0
        self._join_observers: frozenset[int] = frozenset()
        self._known_at: dict[int, float] = {}
        self._crashed: str | None = None
        self._crash_s = 0.0
        self._crash_observers: frozenset[int] = frozenset()
        self._dead_at: dict[int, float] = {}
        self._first_suspect_s: float | None = None
        self._suspected: set[str] = set()
        self._suspicions: set[tuple[str, int]] = set()
        self._suspect_events = 0
        self._died: set[str] = set()
        self._dead_events = 0

    def start_counting(self) -> None:
        """False positives count from now on (not during a from-scratch bootstrap)."""
        self._counting = True

    def expect_join(self, joiner: int, seed: int, at_s: float, observers: Iterable[int]) -> None:
        self._joiner, self._seed, self._join_s = self._ids[joiner], self._ids[seed], at_s
        self._join_observers = frozenset(observers)

    def expect_failure(self, crashed: int, at_s: float, observers: Iterable[int]) -> None:
        self._crashed, self._crash_s = self._ids[crashed], at_s
        self._crash_observers = frozenset(observers)

    def observe(self, observer: int, events: Iterable[MemberEvent]) -> None:
        for event in events:
            kind, member = event.kind, event.member_id
            if kind in ("joined", "alive"):
                if member == self._joiner and observer in self._join_observers:
                    self._known_at.setdefault(observer, event.at_s)
            elif kind in ("suspect", "dead"):
                if member == self._crashed:
                    if kind == "suspect" and self._first_suspect_s is None:
                        self._first_suspect_s = event.at_s
                    elif kind == "dead" and observer in self._crash_observers:
                        self._dead_at.setdefault(observer, event.at_s)
                elif self._counting:
                    self._false_positive(kind, member, event.incarnation)

    def _false_positive(self, kind: str, member: str, incarnation: int) -> None:
        if kind == "suspect":
            self._suspected.add(member)
            self._suspicions.add((member, incarnation))
            self._suspect_events += 1
        else:
            self._died.add(member)
            self._dead_events += 1

    def join_outcome(self) -> JoinOutcome:
        if self._joiner is None:
            raise RuntimeError("join_outcome() without expect_join()")
        times = _latencies(self._known_at, self._join_s, len(self._join_observers))
        return JoinOutcome(
            node=self._joiner,
            seed_node=self._seed,
            at_s=self._join_s,
            observers=len(self._join_observers),
            knowing=len(self._known_at),
            known_99_99_s=nearest_rank(times, KNOWN_FRACTION),
            known_all_s=nearest_rank(times, 1.0),
        )

    def failure_outcome(self) -> FailureOutcome:
        if self._crashed is None:
            raise RuntimeError("failure_outcome() without expect_failure()")
        times = _latencies(self._dead_at, self._crash_s, len(self._crash_observers))
        first = self._first_suspect_s
        return FailureOutcome(
            node=self._crashed,
            at_s=self._crash_s,
            observers=len(self._crash_observers),
            marked_dead=len(self._dead_at),
            first_suspect_s=None if first is None else first - self._crash_s,
            dead_99_99_s=nearest_rank(times, KNOWN_FRACTION),
            dead_all_s=nearest_rank(times, 1.0),
            detection_median_s=nearest_rank(times, 0.5),
            detection_p99_s=nearest_rank(times, 0.99),
        )

    def false_positives(self) -> FalsePositives:
        return FalsePositives(
            suspected_members=len(self._suspected),
            suspicions=len(self._suspicions),
            suspect_events=self._suspect_events,
            dead_members=len(self._died),
            dead_events=self._dead_events,
        )

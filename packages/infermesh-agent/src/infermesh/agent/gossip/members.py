"""Member records for SWIM: state, incarnation, Lifeguard's dynamic suspicion timer, and the table.

Pure values and arithmetic on `now` passed in; never reads a clock or sends anything. Records are
immutable so that many simulated nodes can share one converged baseline; a change replaces one.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping

import attrs

from infermesh.agent.gossip.messages import NodeSnapshot

__all__ = [
    "Member",
    "MemberBaseline",
    "MemberEvent",
    "MemberState",
    "MemberTable",
    "ProbeRound",
    "Suspicion",
    "suspicion_min_timeout_s",
]


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_GONE = frozenset((MemberState.DEAD, MemberState.LEFT))


@attrs.frozen
class Member:
    """What this node believes about one member; `state_since_s` is when that belief began."""

    member_id: str
    incarnation: int
    state: MemberState
    state_since_s: float
    address: str = ""
    meta: bytes = b""
    # This record as a push-pull entry, built on first use: a record never changes, and nodes
    # started from one baseline share their records, so they share these too.
    _snapshot: NodeSnapshot | None = attrs.field(
        default=None, init=False, eq=False, repr=False, hash=False
    )

    @property
    def is_gone(self) -> bool:
        return self.state in _GONE

    def snapshot(self) -> NodeSnapshot:
        """This record as one entry of a push-pull state exchange."""
        snapshot = self._snapshot
        if snapshot is None:
            snapshot = NodeSnapshot(
                self.member_id, self.incarnation, self.state.value, self.address, self.meta
            )
            object.__setattr__(self, "_snapshot", snapshot)  # a cache, not a change of value
        return snapshot

    def with_state(self, state: MemberState, incarnation: int, since_s: float) -> Member:
        """This record moved to `state` at `incarnation`, as of `since_s` (a new record)."""
        return Member(self.member_id, incarnation, state, since_s, self.address, self.meta)

    def with_alive(self, incarnation: int, address: str, meta: bytes) -> Member:
        """This record at a newer `incarnation` with the address and meta that came with it."""
        return Member(self.member_id, incarnation, self.state, self.state_since_s, address, meta)


@attrs.frozen
class MemberEvent:
    """A change of a member's state as seen by this node (joined = first seen alive)."""

    kind: str  # "joined" | "alive" | "suspect" | "dead" | "left" | "updated" (address or meta)
    member_id: str
    incarnation: int
    at_s: float


@attrs.frozen
class MemberBaseline:
    """One converged membership view, built once and shared read-only by many nodes.

    A simulator starts thousands of nodes from it (`Swim.from_baseline`): each copies only the
    id -> record dict; the records and the id order are shared.
    """

    records: Mapping[str, Member]
    ids: tuple[str, ...]
    live_count: int

    @classmethod
    def of(cls, members: Iterable[Member]) -> MemberBaseline:
        records = {member.member_id: member for member in members}
        live = sum(1 for member in records.values() if not member.is_gone)
        return cls(records, tuple(records), live)


class MemberTable:
    """Every member a node knows, by id: the live count kept up to date, random picks in O(k).

    Members are never forgotten, so ids only grow: the shared baseline's ids come first, then the
    ones this node learned itself. Index `i` names the same member for the table's lifetime.
    """

    __slots__ = ("_live", "_own_ids", "_records", "_shared_ids")

    def __init__(self, members: Iterable[Member] = ()) -> None:
        self._records: dict[str, Member] = {}
        self._shared_ids: tuple[str, ...] = ()
        self._own_ids: list[str] = []
        self._live = 0
        for member in members:
            self.put(member)

    @classmethod
    def from_baseline(cls, baseline: MemberBaseline) -> MemberTable:
        table = cls()
        table._records = dict(baseline.records)
        table._shared_ids = baseline.ids
        table._live = baseline.live_count
        return table

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, member_id: str) -> bool:
        return member_id in self._records

    def __getitem__(self, member_id: str) -> Member:
        return self._records[member_id]

    def get(self, member_id: str) -> Member | None:
        return self._records.get(member_id)

    def values(self) -> Iterator[Member]:
        return iter(self._records.values())

    def as_dict(self) -> dict[str, Member]:
        return dict(self._records)

    @property
    def records(self) -> Mapping[str, Member]:
        """Read-only view of id -> record, for lookups on hot paths (change it through `put`)."""
        return self._records

    @property
    def live_count(self) -> int:
        """Members not dead or left."""
        return self._live

    def put(self, member: Member) -> None:
        """Add a member or replace its record (records are immutable: never edit one in place)."""
        old = self._records.get(member.member_id)
        if old is None:
            self._own_ids.append(member.member_id)
            self._live += not member.is_gone
        else:
            self._live += old.is_gone - member.is_gone
        self._records[member.member_id] = member

    def at(self, index: int) -> Member:
        """The member at `index` (0 <= index < len(self)) in the order they were learned."""
        shared = len(self._shared_ids)
        member_id = self._shared_ids[index] if index < shared else self._own_ids[index - shared]
        return self._records[member_id]

    def sample(self, rng: random.Random, count: int, accept: Callable[[Member], bool]) -> list[str]:
        """Up to `count` distinct random members that `accept` takes, uniformly, in random order.

        Draws random indices and rejects misses (O(count) when most members qualify); falls back
        to one scan when rejection keeps failing (small tables, or most members gone).
        """
        size = len(self._records)
        if count <= 0 or size == 0:
            return []
        chosen: list[str] = []
        if size > 4 * count:
            for _ in range(4 * count + 8):
                member = self.at(rng.randrange(size))
                if accept(member) and member.member_id not in chosen:
                    chosen.append(member.member_id)
                    if len(chosen) == count:
                        return chosen
        rest = [m.member_id for m in self._records.values() if accept(m)]
        if chosen:
            rest = [member_id for member_id in rest if member_id not in chosen]
        return chosen + rng.sample(rest, min(count - len(chosen), len(rest)))


class ProbeRound:
    """A probe round: every index of the table once, in a fresh random order, drawn lazily.

    A lazy Fisher-Yates shuffle over indices 0..size-1: memory grows with the draws made, not with
    the table. Members learned mid-round extend `size` and so land at a uniformly random position
    among the draws still to come.
    """

    __slots__ = ("_moved", "_next")

    def __init__(self) -> None:
        self._next = 0
        self._moved: dict[int, int] = {}

    def draw(self, rng: random.Random, size: int) -> int | None:
        """The next index of this round, or None once all `size` indices were drawn."""
        position = self._next
        if position >= size:
            return None
        pick = rng.randrange(position, size)
        at_position = self._moved.pop(position, position)
        if pick == position:
            chosen = at_position
        else:
            chosen = self._moved.get(pick, pick)
            self._moved[pick] = at_position
        self._next = position + 1
        return chosen

    def restart(self) -> None:
        self._next = 0
        self._moved.clear()


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
    # started_s + timeout_s, kept current by confirm(): nodes read it on every event.
    _deadline_s: float = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._deadline_s = self.started_s + self.timeout_s

    def confirm(self, accuser: str) -> bool:
        """Count `accuser` as a new independent confirmation; False if it adds nothing."""
        if accuser == self.first_accuser or accuser in self.confirmers:
            return False
        if len(self.confirmers) >= self.expected_confirmations:
            return False
        self.confirmers.add(accuser)
        self._deadline_s = self.started_s + self.timeout_s
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
        return self._deadline_s

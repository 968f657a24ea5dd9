"""The SWIM membership state machine with Lifeguard refinements, driven only by `(now, event)`.

`tick(now)`, `receive(now, sender, message)`, `join`, `leave` return the messages to send and
`next_deadline_s` says when to tick next. This module schedules the work (probes, gossip,
push-pull) and routes messages; the membership rules live in membership.py and the failure
detector in probes.py. It must never open sockets, sleep or read a clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from infermesh.agent.gossip.awareness import Awareness
from infermesh.agent.gossip.config import SwimConfig, scaled_push_pull_interval_s
from infermesh.agent.gossip.members import (
    Member,
    MemberBaseline,
    MemberEvent,
    MemberState,
    MemberTable,
)
from infermesh.agent.gossip.membership import Membership
from infermesh.agent.gossip.messages import (
    Ack,
    Gossip,
    Message,
    Nack,
    Outgoing,
    Ping,
    PingReq,
    PushPull,
    Update,
)
from infermesh.agent.gossip.probes import Prober

__all__ = ["Swim"]


class Swim:
    """One node's view of the cluster. Not thread-safe; drive it from one task."""

    def __init__(
        self,
        self_id: str,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        *,
        address: str = "",
        meta: bytes = b"",
    ) -> None:
        if not self_id:
            raise ValueError("Swim needs a non-empty self_id")
        me = Member(self_id, 0, MemberState.ALIVE, now, address, meta)
        self._start(self_id, config, rng, now, MemberTable([me]))

    def _start(
        self, self_id: str, config: SwimConfig, rng: random.Random, now: float, table: MemberTable
    ) -> None:
        self.self_id = self_id
        self.config = config
        self._rng = rng
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._membership = Membership(self_id, config, table, self._awareness)
        self._members = table
        self._prober = Prober(
            config, rng, self._membership, self._awareness, now + config.probe_interval_s
        )
        self._next_gossip_s = now + config.gossip_interval_s
        self._next_push_pull_s = now + self._push_pull_interval_s()

    @classmethod
    def from_baseline(
        cls,
        self_id: str,
        config: SwimConfig,
        rng: random.Random,
        now: float,
        baseline: MemberBaseline,
    ) -> Swim:
        """A node that has been part of a converged cluster for a while: it knows `baseline`.

        For simulators: thousands of nodes share the baseline's immutable records (each copies
        only the id -> record dict) instead of replaying thousands of joins. Like memberlist at
        start-up, its probe, gossip and push-pull timers start at random points of their period.
        """
        me = baseline.records.get(self_id)
        if me is None or me.is_gone:
            raise ValueError(
                f"Swim.from_baseline: {self_id!r} is not a live member of the baseline"
            )
        swim = cls.__new__(cls)
        swim._start(self_id, config, rng, now, MemberTable.from_baseline(baseline))
        swim._prober.next_probe_s = now + rng.uniform(0.0, config.probe_interval_s)
        swim._next_gossip_s = now + rng.uniform(0.0, config.gossip_interval_s)
        swim._next_push_pull_s = now + rng.uniform(0.0, swim._push_pull_interval_s())
        return swim

    # ----------------------------------------------------------------- read side
    @property
    def incarnation(self) -> int:
        return self._membership.incarnation

    @property
    def awareness(self) -> int:
        """Lifeguard local health score, 0 (healthy) .. AwarenessMaxMultiplier - 1."""
        return self._awareness.score

    @property
    def members(self) -> dict[str, Member]:
        """Every member this node knows: a new dict of immutable records (O(N): not per message)."""
        return self._members.as_dict()

    def member(self, member_id: str) -> Member | None:
        """What this node believes about `member_id` (immutable), or None if never heard of."""
        return self._members.get(member_id)

    def address_of(self, member_id: str) -> str | None:
        """Where `member_id`'s gossip listens, if known (empty addresses count as unknown)."""
        member = self._members.get(member_id)
        return member.address or None if member is not None else None

    def state_of(self, member_id: str) -> MemberState | None:
        member = self._members.get(member_id)
        return None if member is None else member.state

    @property
    def live_count(self) -> int:
        """Members not dead or left, self included: the N in every log formula."""
        return self._members.live_count

    @property
    def pending_broadcasts(self) -> tuple[Update, ...]:
        return self._membership.broadcasts.pending()

    def random_live_peers(self, count: int) -> list[str]:
        """Up to `count` distinct random members that are alive or suspect, never this node:
        O(count) draws, for choosing who to send something to (no copy of the member list)."""
        self_id = self.self_id
        return self._members.sample(
            self._rng, count, lambda m: m.member_id != self_id and not m.is_gone
        )

    def drain_events(self) -> list[MemberEvent]:
        membership = self._membership
        events, membership.events = membership.events, []
        return events

    @property
    def next_deadline_s(self) -> float:
        deadline = self._next_gossip_s
        if not self._membership.left:
            deadline = min(deadline, self._prober.next_probe_s, self._next_push_pull_s)
        deadline = self._prober.deadline_s(deadline)
        for suspicion in self._membership.suspicions.values():
            deadline = min(deadline, suspicion.deadline_s)
        return deadline

    def _push_pull_interval_s(self) -> float:
        """The configured interval, scaled with the live cluster size as memberlist does."""
        return scaled_push_pull_interval_s(self.config.push_pull_interval_s, self.live_count)

    # --------------------------------------------------------------- commands
    def join(self, now: float, seeds: Iterable[str]) -> list[Outgoing]:
        """Announce ourselves to `seeds` with a full-state push-pull that asks for theirs."""
        self._membership.announce()
        state = self._membership.snapshot()
        return [
            Outgoing(seed, PushPull(state, reply=True)) for seed in seeds if seed != self.self_id
        ]

    def update_meta(self, now: float, meta: bytes) -> None:
        """Change this node's metadata: a new incarnation carries it to every member."""
        self._membership.update_meta(meta)

    def leave(self, now: float) -> list[Outgoing]:
        """Leave gracefully: broadcast `Leave` and stop probing; keep ticking to gossip it."""
        if self._membership.left:
            return []
        self._membership.leave(now)
        self._prober.stop()
        return self._gossip(now)

    # ------------------------------------------------------------------ events
    def tick(self, now: float) -> list[Outgoing]:
        membership = self._membership
        membership.expire_suspicions(now)
        out = self._prober.tick(now, probing=not membership.left)
        if not membership.left and now >= self._next_push_pull_s:
            self._next_push_pull_s = now + self._push_pull_interval_s()
            peers = self.random_live_peers(1)
            out += [Outgoing(peer, PushPull(membership.snapshot(), reply=True)) for peer in peers]
        if now >= self._next_gossip_s:
            out += self._gossip(now)
        return out

    def receive(self, now: float, sender: str, message: Message) -> list[Outgoing]:
        membership = self._membership
        if isinstance(message, PushPull):
            membership.merge(now, sender, message.states)
            if message.reply:
                return [Outgoing(sender, PushPull(membership.snapshot(), reply=False))]
            return []
        apply = membership.apply
        for update in message.updates:
            apply(now, update)
        match message:
            case Ping():
                return self._prober.on_ping(sender, message)
            case Ack(seq=seq):
                return self._prober.on_ack(seq)
            case PingReq():
                return self._prober.on_ping_req(now, sender, message)
            case Nack(seq=seq):
                self._prober.on_nack(seq)
                return []
            case Gossip():
                return []
        raise TypeError(f"Swim.receive: unknown message type {type(message).__name__}")

    # ----------------------------------------------------------------- gossip
    def _gossip_peers(self, now: float) -> list[str]:
        """Random live members, and members dead for less than `gossip_to_the_dead_s` (so a
        member wrongly declared dead hears it and can refute), as memberlist gossips."""
        self_id = self.self_id
        to_the_dead_s = self.config.gossip_to_the_dead_s

        def accept(m: Member) -> bool:
            if m.member_id == self_id:
                return False
            if not m.is_gone:
                return True
            return m.state is MemberState.DEAD and now - m.state_since_s < to_the_dead_s

        return self._members.sample(self._rng, self.config.gossip_nodes, accept)

    def _gossip(self, now: float) -> list[Outgoing]:
        self._next_gossip_s = now + self.config.gossip_interval_s
        if not self._membership.broadcasts:
            return []
        out = []
        for peer in self._gossip_peers(now):
            updates = self._membership.take_updates()
            if updates:
                out.append(Outgoing(peer, Gossip(updates)))
        return out

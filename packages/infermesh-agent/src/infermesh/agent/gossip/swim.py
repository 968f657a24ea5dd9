"""The SWIM membership state machine with Lifeguard refinements, driven only by `(now, event)`.

`tick(now)`, `receive(now, sender, message)`, `join`, `leave` return the messages to send and
`next_deadline_s` says when to tick next. It must never open sockets, sleep or read a clock.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import attrs

from infermesh.agent.gossip.broadcasts import BroadcastQueue, retransmit_limit
from infermesh.agent.gossip.config import SwimConfig, scaled_push_pull_interval_s
from infermesh.agent.gossip.members import (
    Member,
    MemberBaseline,
    MemberEvent,
    MemberState,
    MemberTable,
    ProbeRound,
    Suspicion,
    suspicion_min_timeout_s,
)
from infermesh.agent.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Leave,
    Message,
    Nack,
    NodeSnapshot,
    Outgoing,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Update,
)

__all__ = ["Swim"]


@attrs.define
class _Probe:
    seq: int
    target: str
    timeout_at_s: float  # direct ack expected by then, else indirect probes go out
    ends_at_s: float  # end of the (scaled) probe interval: verdict time
    acked: bool = False
    indirect_sent: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@attrs.define
class _Relay:
    requester: str
    requester_seq: int
    deadline_s: float


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
        self.self_id = self_id
        self.config = config
        self._rng = rng
        self._members = MemberTable([Member(self_id, 0, MemberState.ALIVE, now, address, meta)])
        self._records = self._members.records  # read-only lookups on hot paths
        self._suspicions: dict[str, Suspicion] = {}
        self._broadcasts = BroadcastQueue()
        self._events: list[MemberEvent] = []
        self._probe_round = ProbeRound()
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._awareness = 0
        self._left = False
        self._next_probe_s = now + config.probe_interval_s
        self._next_gossip_s = now + config.gossip_interval_s
        self._next_push_pull_s = now + self._push_pull_interval_s()
        self._limit_cache = (0, retransmit_limit(config.retransmit_mult, 0))

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
        swim = cls(self_id, config, rng, now, address=me.address, meta=me.meta)
        swim._members = MemberTable.from_baseline(baseline)
        swim._records = swim._members.records
        swim._next_probe_s = now + rng.uniform(0.0, config.probe_interval_s)
        swim._next_gossip_s = now + rng.uniform(0.0, config.gossip_interval_s)
        swim._next_push_pull_s = now + rng.uniform(0.0, swim._push_pull_interval_s())
        return swim

    # ----------------------------------------------------------------- read side
    @property
    def incarnation(self) -> int:
        return self._members[self.self_id].incarnation

    @property
    def awareness(self) -> int:
        """Lifeguard local health score, 0 (healthy) .. AwarenessMaxMultiplier - 1."""
        return self._awareness

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
        return self._broadcasts.pending()

    def random_live_peers(self, count: int) -> list[str]:
        """Up to `count` distinct random members that are alive or suspect, never this node:
        O(count) draws, for choosing who to send something to (no copy of the member list)."""
        self_id = self.self_id
        return self._members.sample(
            self._rng, count, lambda m: m.member_id != self_id and not m.is_gone
        )

    def drain_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    @property
    def next_deadline_s(self) -> float:
        deadline = self._next_gossip_s
        if not self._left:
            deadline = min(deadline, self._next_probe_s, self._next_push_pull_s)
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.ends_at_s)
            if not probe.indirect_sent and not probe.acked:
                deadline = min(deadline, probe.timeout_at_s)
        for relay in self._relays.values():
            deadline = min(deadline, relay.deadline_s)
        for suspicion in self._suspicions.values():
            deadline = min(deadline, suspicion.deadline_s)
        return deadline

    def _push_pull_interval_s(self) -> float:
        """The configured interval, scaled with the live cluster size as memberlist does."""
        return scaled_push_pull_interval_s(self.config.push_pull_interval_s, self.live_count)

    def _scaled(self, seconds: float) -> float:
        return seconds * (self._awareness + 1)

    # --------------------------------------------------------------- commands
    def join(self, now: float, seeds: Iterable[str]) -> list[Outgoing]:
        """Announce ourselves to `seeds` with a full-state push-pull that asks for theirs."""
        self._queue_update(self._self_alive())
        state = self._state_snapshot()
        return [
            Outgoing(seed, PushPull(state, reply=True)) for seed in seeds if seed != self.self_id
        ]

    def update_meta(self, now: float, meta: bytes) -> None:
        """Change this node's metadata: a new incarnation carries it to every member."""
        me = self._members[self.self_id]
        if self._left or me.meta == meta:
            return
        self._members.put(me.with_alive(me.incarnation + 1, me.address, meta))
        self._queue_update(self._self_alive())

    def _self_alive(self) -> Alive:
        me = self._members[self.self_id]
        return Alive(self.self_id, me.incarnation, me.address, me.meta)

    def leave(self, now: float) -> list[Outgoing]:
        """Leave gracefully: broadcast `Leave` and stop probing; keep ticking to gossip it."""
        if self._left:
            return []
        self._left = True
        self._probe = None
        self._suspicions.clear()
        me = self._members[self.self_id]
        self._members.put(me.with_state(MemberState.LEFT, me.incarnation, now))
        self._queue_update(Leave(self.self_id, me.incarnation))
        return self._gossip(now)

    # ------------------------------------------------------------------ events
    def tick(self, now: float) -> list[Outgoing]:
        out: list[Outgoing] = []
        for member_id, suspicion in list(self._suspicions.items()):
            if now >= suspicion.deadline_s:
                self._declare_dead(now, member_id, suspicion.incarnation)
        for relay_seq, relay in list(self._relays.items()):
            if now >= relay.deadline_s:
                del self._relays[relay_seq]
                out.append(self._send(relay.requester, Nack(relay.requester_seq)))
        probe = self._probe
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.timeout_at_s:
                out += self._send_indirect_probes(probe)
            if now >= probe.ends_at_s:
                self._finish_probe(now, probe)
        if not self._left and now >= self._next_probe_s:
            out += self._start_probe(now)
        if not self._left and now >= self._next_push_pull_s:
            self._next_push_pull_s = now + self._push_pull_interval_s()
            peers = self.random_live_peers(1)
            out += [Outgoing(peer, PushPull(self._state_snapshot(), reply=True)) for peer in peers]
        if now >= self._next_gossip_s:
            out += self._gossip(now)
        return out

    def receive(self, now: float, sender: str, message: Message) -> list[Outgoing]:
        if isinstance(message, PushPull):
            for snapshot in message.states:
                known = self._records.get(snapshot.member)
                if (
                    known is not None
                    and snapshot.state == "alive"
                    and snapshot.incarnation <= known.incarnation
                    and snapshot.member != self.self_id
                ):
                    continue  # what _apply does with an Alive that is not news, without building it
                alive = Alive(
                    snapshot.member, snapshot.incarnation, snapshot.address, snapshot.meta
                )
                if snapshot.member not in self._members and snapshot.state != "left":
                    # Learn of it (and where it is) first, then hear any accusation.
                    self._apply(now, alive)
                self._apply(now, _merge_view(snapshot, alive, sender))
            if message.reply:
                return [Outgoing(sender, PushPull(self._state_snapshot(), reply=False))]
            return []
        for update in message.updates:
            self._apply(now, update)
        match message:
            case Ping(seq=seq, target=target):
                if target != self.self_id:
                    return []
                if self._left:
                    # Still up after leaving: answer with the news, to whoever missed it.
                    return [Outgoing(sender, Ack(seq, (Leave(self.self_id, self.incarnation),)))]
                return [self._send(sender, Ack(seq))]
            case Ack(seq=seq):
                return self._on_ack(sender, seq)
            case PingReq(seq=seq, target=target):
                if self._left:
                    return []
                relay_seq = self._next_seq()
                self._relays[relay_seq] = _Relay(sender, seq, now + self.config.probe_timeout_s)
                return [self._send(target, Ping(relay_seq, target))]
            case Nack(seq=seq):
                if self._probe is not None and self._probe.seq == seq:
                    self._probe.nacks += 1
                return []
            case Gossip():
                return []
        raise TypeError(f"Swim.receive: unknown message type {type(message).__name__}")

    # ----------------------------------------------------------------- probes
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(self, to: str, message: Ping | Ack | PingReq | Nack) -> Outgoing:
        """Attach piggybacked updates to a probe message."""
        updates = self._broadcasts.take(self.config.max_piggyback_updates, self._limit())
        target = self._records.get(to)
        if isinstance(message, Ping) and target is not None and target.state is MemberState.SUSPECT:
            # Lifeguard's buddy system: tell a suspect it is suspected, so it can refute in time.
            buddy = Suspect(to, target.incarnation, self.self_id)
            updates = (buddy, *(u for u in updates if u.member != to))
        return Outgoing(to, attrs.evolve(message, updates=message.updates + updates))

    def _limit(self) -> int:
        live = self._members.live_count
        if self._limit_cache[0] != live:
            self._limit_cache = (live, retransmit_limit(self.config.retransmit_mult, live))
        return self._limit_cache[1]

    def _next_probe_target(self) -> str | None:
        """Round-robin over live members, each round in a fresh random order (drawn lazily)."""
        for _ in range(2):
            while (index := self._probe_round.draw(self._rng, len(self._members))) is not None:
                member = self._members.at(index)
                if member.member_id != self.self_id and not member.is_gone:
                    return member.member_id
            self._probe_round.restart()
        return None

    def _start_probe(self, now: float) -> list[Outgoing]:
        interval_s = self._scaled(self.config.probe_interval_s)
        self._next_probe_s = now + interval_s
        target = self._next_probe_target()
        if target is None:
            return []
        seq = self._next_seq()
        self._probe = _Probe(
            seq=seq,
            target=target,
            timeout_at_s=now + self._scaled(self.config.probe_timeout_s),
            ends_at_s=now + interval_s,
        )
        return [self._send(target, Ping(seq, target))]

    def _send_indirect_probes(self, probe: _Probe) -> list[Outgoing]:
        probe.indirect_sent = True
        excluded = (self.self_id, probe.target)
        relays = self._members.sample(
            self._rng,
            self.config.indirect_checks,
            lambda m: m.state is MemberState.ALIVE and m.member_id not in excluded,
        )
        probe.expected_nacks = len(relays)
        out = [self._send(relay, PingReq(probe.seq, probe.target)) for relay in relays]
        if self.config.tcp_fallback_ping:
            # As memberlist: also ping the target over TCP (same seq, so its ack completes this
            # probe; it counts like an indirect ack). UDP loss alone then rarely suspects anyone.
            out.append(Outgoing(probe.target, Ping(probe.seq, probe.target), reliable=True))
        return out

    def _on_ack(self, sender: str, seq: int) -> list[Outgoing]:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            return [self._send(relay.requester, Ack(relay.requester_seq))]
        probe = self._probe
        if probe is not None and probe.seq == seq and not probe.acked:
            probe.acked = True
            if not probe.indirect_sent:
                self._adjust_awareness(-1)
        return []

    def _finish_probe(self, now: float, probe: _Probe) -> None:
        self._probe = None
        if probe.acked:
            return
        # Lifeguard: relays that did not even nack suggest that *we* are the slow one.
        if probe.expected_nacks > 0:
            self._adjust_awareness(probe.expected_nacks - probe.nacks)
        else:
            self._adjust_awareness(1)
        target = self._members.get(probe.target)
        # As memberlist: a failed probe of a member already suspected is one more independent
        # confirmation (unless we were its first accuser), shrinking Lifeguard's timeout.
        if target is not None and target.state in (MemberState.ALIVE, MemberState.SUSPECT):
            self._apply(now, Suspect(target.member_id, target.incarnation, self.self_id))

    def _adjust_awareness(self, delta: int) -> None:
        ceiling = self.config.awareness_max_multiplier - 1
        self._awareness = min(ceiling, max(0, self._awareness + delta))

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
        if not self._broadcasts:
            return []
        out = []
        peers = self._gossip_peers(now)
        for peer in peers:
            updates = self._broadcasts.take(self.config.max_piggyback_updates, self._limit())
            if updates:
                out.append(Outgoing(peer, Gossip(updates)))
        return out

    def _state_snapshot(self) -> tuple[NodeSnapshot, ...]:
        return tuple(member.snapshot() for member in self._members.values())

    # ------------------------------------------------------- membership rules
    def _queue_update(self, update: Update) -> None:
        self._broadcasts.push(update)

    def _set_state(self, now: float, member: Member, state: MemberState, incarnation: int) -> None:
        self._members.put(member.with_state(state, incarnation, now))
        self._events.append(MemberEvent(state.value, member.member_id, incarnation, now))

    def _refute(self, incarnation: int) -> None:
        me = self._members[self.self_id]
        self._members.put(me.with_alive(max(me.incarnation, incarnation) + 1, me.address, me.meta))
        self._queue_update(self._self_alive())
        # Lifeguard: being suspected hints that our own processing is slow.
        self._adjust_awareness(1)

    def _apply(self, now: float, update: Update) -> None:
        if update.member == self.self_id:
            self._apply_to_self(update)
            return
        # Most updates arrive many times over (epidemic spread): each handler returns early on
        # news it already has.
        member = self._records.get(update.member)
        if isinstance(update, Alive):
            self._apply_alive(now, member, update)
        elif isinstance(update, Suspect):
            self._apply_suspect(now, member, update)
        elif isinstance(update, Dead):
            if member is None or member.is_gone or update.incarnation < member.incarnation:
                return
            self._suspicions.pop(update.member, None)
            self._set_state(now, member, MemberState.DEAD, update.incarnation)
            self._queue_update(update)
        else:
            if member is None or member.state is MemberState.LEFT:
                return
            if update.incarnation < member.incarnation:
                return
            self._suspicions.pop(update.member, None)
            self._set_state(now, member, MemberState.LEFT, update.incarnation)
            self._queue_update(update)

    def _apply_to_self(self, update: Update) -> None:
        if self._left:
            return
        if isinstance(update, Suspect | Dead) and update.incarnation >= self.incarnation:
            self._refute(update.incarnation)
        elif isinstance(update, Suspect | Dead):
            # The accuser missed our refutation (it may have been lost): repeat it.
            self._queue_update(self._self_alive())
        elif isinstance(update, Alive) and update.incarnation >= self.incarnation:
            me = self._members[self.self_id]
            if update.incarnation > me.incarnation or (update.address, update.meta) != (
                me.address,
                me.meta,
            ):
                # Our older life (before a restart) is known at this incarnation, perhaps
                # with other metadata: outbid it so our current address and meta win.
                self._members.put(me.with_alive(update.incarnation + 1, me.address, me.meta))
                self._queue_update(self._self_alive())

    def _apply_alive(self, now: float, member: Member | None, update: Alive) -> None:
        member_id, incarnation = update.member, update.incarnation
        if member is None:
            # Added last, it joins this probe round's draws at a random position.
            self._members.put(
                Member(member_id, incarnation, MemberState.ALIVE, now, update.address, update.meta)
            )
            self._events.append(MemberEvent("joined", member_id, incarnation, now))
        elif incarnation <= member.incarnation:
            return
        else:
            changed = (update.address, update.meta) != (member.address, member.meta)
            self._suspicions.pop(member_id, None)
            if member.state is MemberState.ALIVE:
                self._members.put(member.with_alive(incarnation, update.address, update.meta))
                if changed:
                    self._events.append(MemberEvent("updated", member_id, incarnation, now))
            else:
                member = member.with_alive(member.incarnation, update.address, update.meta)
                self._set_state(now, member, MemberState.ALIVE, incarnation)
        self._queue_update(update)

    def _apply_suspect(self, now: float, member: Member | None, update: Suspect) -> None:
        if member is None or member.is_gone or update.incarnation < member.incarnation:
            return
        suspicion = self._suspicions.get(update.member)
        if member.state is MemberState.SUSPECT and suspicion is not None:
            if update.incarnation == suspicion.incarnation and suspicion.confirm(update.accuser):
                self._queue_update(update)
            return
        self._set_state(now, member, MemberState.SUSPECT, update.incarnation)
        self._suspicions[update.member] = self._new_suspicion(
            now, update.incarnation, update.accuser
        )
        self._queue_update(update)

    def _new_suspicion(self, now: float, incarnation: int, accuser: str) -> Suspicion:
        cluster_size = self.live_count
        min_s = suspicion_min_timeout_s(
            self.config.suspicion_mult, cluster_size, self.config.probe_interval_s
        )
        # memberlist expects SuspicionMult - 2 confirmations, none in a cluster too small for them.
        expected = int(self.config.suspicion_mult) - 2
        if cluster_size - 2 < expected:
            expected = 0
        return Suspicion(
            incarnation=incarnation,
            started_s=now,
            min_timeout_s=min_s,
            max_timeout_s=min_s * self.config.suspicion_max_timeout_mult,
            expected_confirmations=expected,
            first_accuser=accuser,
        )

    def _declare_dead(self, now: float, member_id: str, incarnation: int) -> None:
        self._apply(now, Dead(member_id, incarnation, self.self_id))


def _merge_view(snapshot: NodeSnapshot, alive: Alive, sender: str) -> Update:
    """The update a pushed member state means to us. A remote 'dead' is only a suspicion: we
    have not seen it die ourselves."""
    match snapshot.state:
        case "suspect" | "dead":
            return Suspect(snapshot.member, snapshot.incarnation, sender)
        case "left":
            return Leave(snapshot.member, snapshot.incarnation)
    return alive

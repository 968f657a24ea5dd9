"""One node's membership view and the SWIM rules that change it: updates, refutation, suspicion.

It applies Alive/Suspect/Dead/Leave updates and pushed states, queues the news to piggyback and
records member events. It never decides whom to probe or when to send (probes.py, swim.py), and
never reads a clock: `now` is passed in.
"""

from __future__ import annotations

import attrs

from infermesh.agent.gossip.awareness import Awareness
from infermesh.agent.gossip.broadcasts import BroadcastQueue, retransmit_limit
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.members import (
    Member,
    MemberEvent,
    MemberState,
    MemberTable,
    Suspicion,
    suspicion_min_timeout_s,
)
from infermesh.agent.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Leave,
    Nack,
    NodeSnapshot,
    Outgoing,
    Ping,
    PingReq,
    Suspect,
    Update,
)

__all__ = ["Membership"]


class Membership:
    """Every member this node knows, the suspicions it holds and the updates it has to spread.

    `records` is the table's read-only id -> record view, for lookups on hot paths.
    """

    def __init__(
        self, self_id: str, config: SwimConfig, table: MemberTable, awareness: Awareness
    ) -> None:
        self.self_id = self_id
        self.config = config
        self.table = table
        self.records = table.records
        self.suspicions: dict[str, Suspicion] = {}
        self.broadcasts = BroadcastQueue()
        self.events: list[MemberEvent] = []
        self.left = False
        self._awareness = awareness
        self._limit_cache = (0, retransmit_limit(config.retransmit_mult, 0))

    # ----------------------------------------------------------------- read side
    @property
    def incarnation(self) -> int:
        return self.table[self.self_id].incarnation

    def self_alive(self) -> Alive:
        me = self.table[self.self_id]
        return Alive(self.self_id, me.incarnation, me.address, me.meta)

    def snapshot(self) -> tuple[NodeSnapshot, ...]:
        """Every member as push-pull entries."""
        return tuple(member.snapshot() for member in self.table.values())

    def take_updates(self) -> tuple[Update, ...]:
        """The next updates to piggyback, counted as sent once more."""
        return self.broadcasts.take(self.config.max_piggyback_updates, self._limit())

    def piggybacked(self, to: str, message: Ping | Ack | PingReq | Nack) -> Outgoing:
        """`message` to `to` with piggybacked updates attached."""
        updates = self.take_updates()
        target = self.records.get(to)
        if isinstance(message, Ping) and target is not None and target.state is MemberState.SUSPECT:
            # Lifeguard's buddy system: tell a suspect it is suspected, so it can refute in time.
            buddy = Suspect(to, target.incarnation, self.self_id)
            updates = (buddy, *(u for u in updates if u.member != to))
        return Outgoing(to, attrs.evolve(message, updates=message.updates + updates))

    def _limit(self) -> int:
        live = self.table.live_count
        if self._limit_cache[0] != live:
            self._limit_cache = (live, retransmit_limit(self.config.retransmit_mult, live))
        return self._limit_cache[1]

    # ------------------------------------------------------------ our own record
    def announce(self) -> None:
        """Spread that we are alive (on joining)."""
        self.broadcasts.push(self.self_alive())

    def update_meta(self, meta: bytes) -> None:
        """Change our metadata: a new incarnation carries it to every member."""
        me = self.table[self.self_id]
        if self.left or me.meta == meta:
            return
        self.table.put(me.with_alive(me.incarnation + 1, me.address, meta))
        self.broadcasts.push(self.self_alive())

    def leave(self, now: float) -> None:
        """Mark ourselves left, drop every suspicion we hold and spread the `Leave`."""
        self.left = True
        self.suspicions.clear()
        me = self.table[self.self_id]
        self.table.put(me.with_state(MemberState.LEFT, me.incarnation, now))
        self.broadcasts.push(Leave(self.self_id, me.incarnation))

    # ----------------------------------------------------------------- changes
    def accuse(self, now: float, member_id: str) -> None:
        """Our own probe of `member_id` failed: suspect it.

        As memberlist: a failed probe of a member already suspected is one more independent
        confirmation (unless we were its first accuser), shrinking Lifeguard's timeout.
        """
        target = self.table.get(member_id)
        if target is not None and target.state in (MemberState.ALIVE, MemberState.SUSPECT):
            self.apply(now, Suspect(target.member_id, target.incarnation, self.self_id))

    def expire_suspicions(self, now: float) -> None:
        """Declare dead every suspect whose suspicion timed out by `now`."""
        for member_id, suspicion in list(self.suspicions.items()):
            if now >= suspicion.deadline_s:
                self.apply(now, Dead(member_id, suspicion.incarnation, self.self_id))

    def merge(self, now: float, sender: str, states: tuple[NodeSnapshot, ...]) -> None:
        """Apply the member states `sender` pushed (push-pull)."""
        records, self_id = self.records, self.self_id
        for snapshot in states:
            known = records.get(snapshot.member)
            if (
                known is not None
                and snapshot.state == "alive"
                and snapshot.incarnation <= known.incarnation
                and snapshot.member != self_id
            ):
                continue  # what apply does with an Alive that is not news, without building it
            alive = Alive(snapshot.member, snapshot.incarnation, snapshot.address, snapshot.meta)
            if known is None and snapshot.state != "left":
                # Learn of it (and where it is) first, then hear any accusation.
                self.apply(now, alive)
            self.apply(now, _merge_view(snapshot, alive, sender))

    def apply(self, now: float, update: Update) -> None:
        """Apply one update: SWIM's rules by incarnation, Lifeguard's for suspicions."""
        if update.member == self.self_id:
            self._apply_to_self(update)
            return
        # Most updates arrive many times over (epidemic spread): each handler returns early on
        # news it already has.
        member = self.records.get(update.member)
        if isinstance(update, Alive):
            self._apply_alive(now, member, update)
        elif isinstance(update, Suspect):
            self._apply_suspect(now, member, update)
        elif isinstance(update, Dead):
            if member is None or member.is_gone or update.incarnation < member.incarnation:
                return
            self.suspicions.pop(update.member, None)
            self._set_state(now, member, MemberState.DEAD, update.incarnation)
            self.broadcasts.push(update)
        else:
            if member is None or member.state is MemberState.LEFT:
                return
            if update.incarnation < member.incarnation:
                return
            self.suspicions.pop(update.member, None)
            self._set_state(now, member, MemberState.LEFT, update.incarnation)
            self.broadcasts.push(update)

    def _set_state(self, now: float, member: Member, state: MemberState, incarnation: int) -> None:
        self.table.put(member.with_state(state, incarnation, now))
        self.events.append(MemberEvent(state.value, member.member_id, incarnation, now))

    def _apply_to_self(self, update: Update) -> None:
        if self.left:
            return
        if isinstance(update, Suspect | Dead) and update.incarnation >= self.incarnation:
            self._refute(update.incarnation)
        elif isinstance(update, Suspect | Dead):
            # The accuser missed our refutation (it may have been lost): repeat it.
            self.broadcasts.push(self.self_alive())
        elif isinstance(update, Alive) and update.incarnation >= self.incarnation:
            me = self.table[self.self_id]
            if update.incarnation > me.incarnation or (update.address, update.meta) != (
                me.address,
                me.meta,
            ):
                # Our older life (before a restart) is known at this incarnation, perhaps
                # with other metadata: outbid it so our current address and meta win.
                self.table.put(me.with_alive(update.incarnation + 1, me.address, me.meta))
                self.broadcasts.push(self.self_alive())

    def _refute(self, incarnation: int) -> None:
        me = self.table[self.self_id]
        self.table.put(me.with_alive(max(me.incarnation, incarnation) + 1, me.address, me.meta))
        self.broadcasts.push(self.self_alive())
        # Lifeguard: being suspected hints that our own processing is slow.
        self._awareness.adjust(1)

    def _apply_alive(self, now: float, member: Member | None, update: Alive) -> None:
        member_id, incarnation = update.member, update.incarnation
        if member is None:
            # Added last, it joins this probe round's draws at a random position.
            self.table.put(
                Member(member_id, incarnation, MemberState.ALIVE, now, update.address, update.meta)
            )
            self.events.append(MemberEvent("joined", member_id, incarnation, now))
        elif incarnation <= member.incarnation:
            return
        else:
            changed = (update.address, update.meta) != (member.address, member.meta)
            self.suspicions.pop(member_id, None)
            if member.state is MemberState.ALIVE:
                self.table.put(member.with_alive(incarnation, update.address, update.meta))
                if changed:
                    self.events.append(MemberEvent("updated", member_id, incarnation, now))
            else:
                member = member.with_alive(member.incarnation, update.address, update.meta)
                self._set_state(now, member, MemberState.ALIVE, incarnation)
        self.broadcasts.push(update)

    def _apply_suspect(self, now: float, member: Member | None, update: Suspect) -> None:
        if member is None or member.is_gone or update.incarnation < member.incarnation:
            return
        suspicion = self.suspicions.get(update.member)
        if member.state is MemberState.SUSPECT and suspicion is not None:
            if update.incarnation == suspicion.incarnation and suspicion.confirm(update.accuser):
                self.broadcasts.push(update)
            return
        self._set_state(now, member, MemberState.SUSPECT, update.incarnation)
        self.suspicions[update.member] = self._new_suspicion(
            now, update.incarnation, update.accuser
        )
        self.broadcasts.push(update)

    def _new_suspicion(self, now: float, incarnation: int, accuser: str) -> Suspicion:
        cluster_size = self.table.live_count
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


def _merge_view(snapshot: NodeSnapshot, alive: Alive, sender: str) -> Update:
    """The update a pushed member state means to us. A remote 'dead' is only a suspicion: we
    have not seen it die ourselves."""
    match snapshot.state:
        case "suspect" | "dead":
            return Suspect(snapshot.member, snapshot.incarnation, sender)
        case "left":
            return Leave(snapshot.member, snapshot.incarnation)
    return alive

"""SWIM's failure detector: one probe per interval, indirect probes through relays, memberlist's
TCP fallback ping, and relaying other nodes' probes, with Lifeguard's nack and awareness rules.

It decides whom to ping and what a probe's outcome means; a failed probe becomes a suspicion
through `Membership`. It never sends anything itself nor reads a clock: `now` is passed in.
"""

from __future__ import annotations

import random

import attrs

from infermesh.agent.gossip.awareness import Awareness
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.members import MemberState, ProbeRound
from infermesh.agent.gossip.membership import Membership
from infermesh.agent.gossip.messages import Ack, Leave, Nack, Outgoing, Ping, PingReq

__all__ = ["Prober"]


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


class Prober:
    """This node's probe in flight, the probes it relays for others, and when to probe next."""

    def __init__(
        self,
        config: SwimConfig,
        rng: random.Random,
        membership: Membership,
        awareness: Awareness,
        next_probe_s: float,
    ) -> None:
        self.config = config
        self.next_probe_s = next_probe_s
        self._rng = rng
        self._membership = membership
        self._awareness = awareness
        self._round = ProbeRound()
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0

    def deadline_s(self, deadline: float) -> float:
        """The earlier of `deadline` and this prober's next own deadline, the next probe aside."""
        probe = self._probe
        if probe is not None:
            deadline = min(deadline, probe.ends_at_s)
            if not probe.indirect_sent and not probe.acked:
                deadline = min(deadline, probe.timeout_at_s)
        for relay in self._relays.values():
            deadline = min(deadline, relay.deadline_s)
        return deadline

    def stop(self) -> None:
        """Forget the probe in flight (we left: its verdict no longer matters)."""
        self._probe = None

    def tick(self, now: float, *, probing: bool) -> list[Outgoing]:
        """Nack relays that timed out, escalate or judge our probe, and start the next one
        when it is due (only while `probing`)."""
        out: list[Outgoing] = []
        for relay_seq, relay in list(self._relays.items()):
            if now >= relay.deadline_s:
                del self._relays[relay_seq]
                out.append(self._membership.piggybacked(relay.requester, Nack(relay.requester_seq)))
        probe = self._probe
        if probe is not None:
            if not probe.acked and not probe.indirect_sent and now >= probe.timeout_at_s:
                out += self._send_indirect_probes(probe)
            if now >= probe.ends_at_s:
                self._finish_probe(now, probe)
        if probing and now >= self.next_probe_s:
            out += self._start_probe(now)
        return out

    # ------------------------------------------------------------------ input
    def on_ping(self, sender: str, ping: Ping) -> list[Outgoing]:
        """Answer a ping of us with an ack (of a ping meant for someone else: nothing)."""
        membership = self._membership
        if ping.target != membership.self_id:
            return []
        if membership.left:
            # Still up after leaving: answer with the news, to whoever missed it.
            leave = Leave(membership.self_id, membership.incarnation)
            return [Outgoing(sender, Ack(ping.seq, (leave,)))]
        return [membership.piggybacked(sender, Ack(ping.seq))]

    def on_ping_req(self, now: float, sender: str, request: PingReq) -> list[Outgoing]:
        """Probe `request.target` for `sender`; its ack is relayed, else a nack on timeout."""
        if self._membership.left:
            return []
        relay_seq = self._next_seq()
        self._relays[relay_seq] = _Relay(sender, request.seq, now + self.config.probe_timeout_s)
        return [self._membership.piggybacked(request.target, Ping(relay_seq, request.target))]

    def on_ack(self, seq: int) -> list[Outgoing]:
        relay = self._relays.pop(seq, None)
        if relay is not None:
            return [self._membership.piggybacked(relay.requester, Ack(relay.requester_seq))]
        probe = self._probe
        if probe is not None and probe.seq == seq and not probe.acked:
            probe.acked = True
            if not probe.indirect_sent:
                self._awareness.adjust(-1)
        return []

    def on_nack(self, seq: int) -> None:
        if self._probe is not None and self._probe.seq == seq:
            self._probe.nacks += 1

    # ----------------------------------------------------------------- probes
    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _next_target(self) -> str | None:
        """Round-robin over live members, each round in a fresh random order (drawn lazily)."""
        table, self_id = self._membership.table, self._membership.self_id
        for _ in range(2):
            while (index := self._round.draw(self._rng, len(table))) is not None:
                member = table.at(index)
                if member.member_id != self_id and not member.is_gone:
                    return member.member_id
            self._round.restart()
        return None

    def _start_probe(self, now: float) -> list[Outgoing]:
        interval_s = self._awareness.scaled(self.config.probe_interval_s)
        self.next_probe_s = now + interval_s
        target = self._next_target()
        if target is None:
            return []
        seq = self._next_seq()
        self._probe = _Probe(
            seq=seq,
            target=target,
            timeout_at_s=now + self._awareness.scaled(self.config.probe_timeout_s),
            ends_at_s=now + interval_s,
        )
        return [self._membership.piggybacked(target, Ping(seq, target))]

    def _send_indirect_probes(self, probe: _Probe) -> list[Outgoing]:
        probe.indirect_sent = True
        membership = self._membership
        excluded = (membership.self_id, probe.target)
        relays = membership.table.sample(
            self._rng,
            self.config.indirect_checks,
            lambda m: m.state is MemberState.ALIVE and m.member_id not in excluded,
        )
        probe.expected_nacks = len(relays)
        out = [membership.piggybacked(relay, PingReq(probe.seq, probe.target)) for relay in relays]
        if self.config.tcp_fallback_ping:
            # As memberlist: also ping the target over TCP (same seq, so its ack completes this
            # probe; it counts like an indirect ack). UDP loss alone then rarely suspects anyone.
            out.append(Outgoing(probe.target, Ping(probe.seq, probe.target), reliable=True))
        return out

    def _finish_probe(self, now: float, probe: _Probe) -> None:
        self._probe = None
        if probe.acked:
            return
        # Lifeguard: relays that did not even nack suggest that *we* are the slow one.
        if probe.expected_nacks > 0:
            self._awareness.adjust(probe.expected_nacks - probe.nacks)
        else:
            self._awareness.adjust(1)
        self._membership.accuse(now, probe.target)

"""One gossip node without I/O: SWIM membership, node-state entries, Vivaldi, codec and keyring.

Turns bytes in into bytes out (`Send`) and keeps the counters; the shell moves the bytes and
calls `tick` at `next_deadline_s`. It never opens sockets, sleeps or reads a clock.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import attrs

from infermesh.agent.gossip.codec import (
    MAX_PACKET_BYTES,
    DecodeError,
    Packet,
    PacketTooLarge,
    decode_meta,
    decode_packet,
    decode_stream,
    encode_meta,
    encode_packet,
    encode_stream,
)
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.keyring import SEAL_OVERHEAD, BadPacket, Keyring, SealError, UnknownKey
from infermesh.agent.gossip.members import MemberEvent
from infermesh.agent.gossip.messages import (
    Ack,
    Dead,
    Message,
    Outgoing,
    Ping,
    PushPull,
    Suspect,
)
from infermesh.agent.gossip.statesync import StateBook
from infermesh.agent.gossip.swim import Swim
from infermesh.agent.gossip.values import NodeMeta, StateEntry
from infermesh.agent.gossip.vivaldi import NetworkMap, VivaldiClient, VivaldiConfig
from infermesh.core.model import GpuState, ModelState

__all__ = ["GossipCounters", "GossipNode", "MemberInfo", "NodeSettings", "Send"]

# Ping send times older than this can no longer be matched by an ack worth measuring.
_PING_MEMORY_S = 30.0
_MAX_PENDING_PINGS = 4096
# Room one node-state entry is assumed to need in a datagram (a typical one encodes to ~250).
_ENTRY_BUDGET = 300
_STATES_PER_GOSSIP = 5  # entries in one state-only datagram round (about one full datagram)
# Fallback addresses learned from packets (senders not yet in the membership), bounded.
_MAX_ADDRESS_BOOK = 4096
_MAX_CACHED_METAS = 4096


@attrs.frozen
class Send:
    """Bytes for the shell to send to `address` (`host:port`): a UDP datagram, or one TCP
    message when `stream` is true (the shell frames it)."""

    address: str
    data: bytes
    stream: bool


@attrs.define
class GossipCounters:
    """What the node did, for metrics: SWIM work, traffic and dropped input by reason."""

    probes: int = 0
    suspicions: int = 0
    refutations: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    packets_out: int = 0
    dropped: dict[str, int] = attrs.field(factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@attrs.frozen
class MemberInfo:
    """One member as this node sees it; `meta` is None when its metadata cannot be decoded."""

    node: str
    state: str  # alive | suspect | dead | left
    incarnation: int
    address: str
    meta: NodeMeta | None
    rtt_s: float | None


@attrs.frozen
class NodeSettings:
    """What a node is: its id, the address others reach it at, and how it gossips.

    `keyring` None means plaintext gossip (insecure). `inject_loss` drops that fraction of
    inbound datagrams (fault injection for tests and benchmarks). `states_per_packet` caps the
    node-state entries piggybacked on one datagram.
    """

    node_id: str
    address: str
    swim: SwimConfig
    meta: NodeMeta
    keyring: Keyring | None
    vivaldi: VivaldiConfig = attrs.Factory(VivaldiConfig)
    inject_loss: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0)])
    states_per_packet: int = attrs.field(default=4, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("NodeSettings.node_id must not be empty")
        if not 0.0 <= self.inject_loss < 1.0:
            raise ValueError(f"inject_loss must be in [0, 1), got {self.inject_loss!r}")


class GossipNode:
    """Swim + StateBook + Vivaldi behind one byte-level interface. Drive it from one task."""

    def __init__(
        self, settings: NodeSettings, book: StateBook, rng: random.Random, now: float
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.address = settings.address
        self.keyring = settings.keyring
        self.book = book
        self.counters = GossipCounters()
        self._rng = rng
        self._swim = Swim(
            settings.node_id,
            settings.swim,
            rng,
            now,
            address=settings.address,
            meta=encode_meta(settings.meta),
        )
        self._vivaldi = VivaldiClient(settings.vivaldi, rng)
        self._network = NetworkMap(self._vivaldi)
        self._pings: dict[int, tuple[str, float]] = {}
        self._addresses: dict[str, str] = {}
        self._events: list[MemberEvent] = []
        self._meta_cache: dict[bytes, NodeMeta | None] = {}
        self._next_state_gossip_s = now + settings.swim.gossip_interval_s

    # ----------------------------------------------------------------- read side
    @property
    def swim(self) -> Swim:
        return self._swim

    @property
    def next_deadline_s(self) -> float:
        return min(self._swim.next_deadline_s, self._next_state_gossip_s)

    def drain_events(self) -> list[MemberEvent]:
        events, self._events = self._events, []
        return events

    def rtt_s(self, node: str) -> float | None:
        """Estimated round-trip time to `node` from the Vivaldi coordinates (None if unknown)."""
        if node == self.node_id:
            return 0.0
        return self._network.rtt_s(node)

    def members(self) -> list[MemberInfo]:
        return [
            MemberInfo(
                node=m.member_id,
                state=m.state.value,
                incarnation=m.incarnation,
                address=m.address,
                meta=self._meta(m.meta),
                rtt_s=self.rtt_s(m.member_id),
            )
            for m in self._swim.members.values()
        ]

    def _meta(self, raw: bytes) -> NodeMeta | None:
        if raw not in self._meta_cache:
            if len(self._meta_cache) > _MAX_CACHED_METAS:
                self._meta_cache.clear()
            try:
                self._meta_cache[raw] = decode_meta(raw)
            except DecodeError:
                self._meta_cache[raw] = None
        return self._meta_cache[raw]

    # ------------------------------------------------------------------ commands
    def join(self, now: float, seeds: Sequence[str]) -> list[Send]:
        """Push-pull our full state to each seed address (not our own) over TCP."""
        seeds = [seed for seed in seeds if seed != self.address]
        return self._after(now, self._swim.join(now, seeds), address_is_literal=True)

    def leave(self, now: float) -> list[Send]:
        return self._after(now, self._swim.leave(now))

    def update_meta(self, now: float, meta: NodeMeta) -> None:
        self._swim.update_meta(now, encode_meta(meta))

    def publish(self, now: float, state: ModelState | GpuState) -> None:
        """A local state changed: gossip it."""
        self.book.publish(now, state)

    def tick(self, now: float) -> list[Send]:
        sends = self._after(now, self._swim.tick(now), counting_probes=True)
        if now >= self._next_state_gossip_s:
            self._next_state_gossip_s = now + self.settings.swim.gossip_interval_s
            sends += self._gossip_states(now)
        self._forget_old_pings(now)
        return sends

    # ------------------------------------------------------------------ input
    def on_datagram(self, now: float, data: bytes, source: str) -> list[Send]:
        """One UDP datagram from `source` (`host:port`)."""
        self.counters.packets_in += 1
        self.counters.bytes_in += len(data)
        if self.settings.inject_loss and self._rng.random() < self.settings.inject_loss:
            self.counters.drop("injected_loss")
            return []
        packet = self._open(data, decode_packet)
        if packet is None:
            return []
        reply, sends = self._receive(now, packet)
        return sends + reply

    def on_stream(self, now: float, data: bytes, source: str) -> tuple[bytes | None, list[Send]]:
        """One TCP message from `source`; returns the reply for the same connection, if any."""
        self.counters.packets_in += 1
        self.counters.bytes_in += len(data)
        packet = self._open(data, decode_stream)
        if packet is None:
            return None, []
        replies, sends = self._receive(now, packet, reply_to_stream=True)
        return (replies[0].data if replies else None), sends

    def _open(self, data: bytes, decode: Callable[[bytes], Packet]) -> Packet | None:
        plaintext = data
        if self.keyring is not None:
            try:
                plaintext = self.keyring.open(data)
            except UnknownKey:
                self.counters.drop("unknown_key")
                return None
            except (BadPacket, SealError):
                self.counters.drop("bad_seal")
                return None
        try:
            packet = decode(plaintext)
        except DecodeError:
            self.counters.drop("malformed")
            return None
        if packet.sender == self.node_id:
            self.counters.drop("from_self")
            return None
        return packet

    def _receive(
        self, now: float, packet: Packet, *, reply_to_stream: bool = False
    ) -> tuple[list[Send], list[Send]]:
        """Apply one decoded packet; returns (reply on the same stream, other sends)."""
        sender = packet.sender
        if self._swim.address_of(sender) is None and packet.sender_address:
            self._remember_address(sender, packet.sender_address)
        if packet.coordinate is not None:
            self._on_coordinate(now, packet)
        if packet.states:
            self.book.merge(now, packet.states)
        replies: list[Send] = []
        sends: list[Send] = []
        for message in packet.messages:
            incarnation = self._swim.incarnation
            outgoing = self._swim.receive(now, sender, message)
            if self._swim.incarnation > incarnation and self._accuses_me(message):
                self.counters.refutations += 1
            for out in outgoing:
                if reply_to_stream and _answers(message, out, sender):
                    # Goes back on the same connection: no address needed.
                    replies += self._encode(now, packet.sender_address, out.message, stream=True)
                else:
                    sends += self._after(now, [out])
        sends += self._after(now, [])
        return replies, sends

    def _accuses_me(self, message: Message) -> bool:
        if isinstance(message, PushPull):
            return any(
                s.member == self.node_id and s.state in ("suspect", "dead") for s in message.states
            )
        return any(
            isinstance(u, Suspect | Dead) and u.member == self.node_id for u in message.updates
        )

    def _on_coordinate(self, now: float, packet: Packet) -> None:
        coordinate = packet.coordinate
        assert coordinate is not None
        for message in packet.messages:
            if not isinstance(message, Ack):
                continue
            sent = self._pings.get(message.seq)
            # A relayed ack comes from the relay, not the target: it measures nothing.
            if sent is not None and sent[0] == packet.sender:
                del self._pings[message.seq]
                self._network.observe(packet.sender, coordinate, now - sent[1])
                return
        self._network.update(packet.sender, coordinate)

    # ------------------------------------------------------------------ output
    def _after(
        self,
        now: float,
        outgoing: list[Outgoing],
        *,
        address_is_literal: bool = False,
        counting_probes: bool = False,
    ) -> list[Send]:
        """Encode Swim's outgoing messages and translate its new events."""
        sends = []
        for out in outgoing:
            address = out.to if address_is_literal else self._address_of(out.to)
            if address is None:
                self.counters.drop("no_address")
                continue
            if isinstance(out.message, Ping) and not out.reliable:
                # A TCP fallback ping shares its probe's seq and measures no datagram RTT.
                self._pings[out.message.seq] = (out.message.target, now)
                if counting_probes:
                    self.counters.probes += 1
            sends += self._encode(now, address, out.message, stream=out.reliable)
        self._translate_events(now)
        return sends

    def _address_of(self, member: str) -> str | None:
        return self._swim.address_of(member) or self._addresses.get(member)

    def _remember_address(self, member: str, address: str) -> None:
        self._addresses.pop(member, None)
        if len(self._addresses) >= _MAX_ADDRESS_BOOK:
            del self._addresses[next(iter(self._addresses))]
        self._addresses[member] = address

    def _encode(
        self, now: float, address: str, message: Message, *, stream: bool = False
    ) -> list[Send]:
        """`message` as sealed bytes: push-pull (with every known node state) and anything
        `stream` (TCP fallback pings and their acks) as one TCP message, the rest by UDP."""
        if isinstance(message, PushPull):
            packet = Packet(self.node_id, self.address, (message,), states=self.book.snapshot(now))
            return self._stream_send(address, packet)
        if stream:
            # No coordinate: a TCP round trip (handshake, late fallback) is no RTT sample.
            return self._stream_send(address, Packet(self.node_id, self.address, (message,)))
        coordinate = self._vivaldi.coordinate if isinstance(message, Ack) else None
        packet = Packet(self.node_id, self.address, (message,), coordinate=coordinate)
        return self._datagram_sends(now, address, packet)

    def _datagram_sends(self, now: float, address: str, packet: Packet) -> list[Send]:
        """`packet` by UDP with the pending state entries that fit (by TCP if it is too large).

        Only as many entries are taken from the book as the room left suggests; any the codec
        still trims go out in datagrams of their own, so every entry taken is really sent.
        """
        limit = self._max_plaintext()
        try:
            plaintext, sent = encode_packet(packet, limit)
        except PacketTooLarge:
            return self._stream_send(address, packet)
        room = min(self.settings.states_per_packet, (limit - len(plaintext)) // _ENTRY_BUDGET)
        states = self.book.take(now, room, self._swim.live_count) if room > 0 else ()
        if states:
            plaintext, sent = encode_packet(attrs.evolve(sent, states=states), limit)
        sends = [self._sealed(address, plaintext, stream=False)]
        return sends + self._state_sends(address, states[len(sent.states) :])

    def _state_sends(self, address: str, states: tuple[StateEntry, ...]) -> list[Send]:
        """State entries in as few datagrams as they fit; one too large for any goes by TCP."""
        sends = []
        limit = self._max_plaintext()
        while states:
            plaintext, sent = encode_packet(Packet(self.node_id, self.address, (), states), limit)
            if sent.states:
                sends.append(self._sealed(address, plaintext, stream=False))
                states = states[len(sent.states) :]
            else:
                sends += self._stream_send(address, attrs.evolve(sent, states=states[:1]))
                states = states[1:]
        return sends

    def _stream_send(self, address: str, packet: Packet) -> list[Send]:
        try:
            plaintext = encode_stream(packet)
        except PacketTooLarge:
            self.counters.drop("too_large")
            return []
        return [self._sealed(address, plaintext, stream=True)]

    def _sealed(self, address: str, plaintext: bytes, *, stream: bool) -> Send:
        data = plaintext if self.keyring is None else self.keyring.seal(plaintext)
        self.counters.packets_out += 1
        self.counters.bytes_out += len(data)
        return Send(address, data, stream)

    def _max_plaintext(self) -> int:
        overhead = 0 if self.keyring is None else SEAL_OVERHEAD
        return MAX_PACKET_BYTES - overhead

    def _gossip_states(self, now: float) -> list[Send]:
        """Node-state entries on their own, to a few random live peers, while any are pending."""
        sends = []
        for peer in self._swim.random_live_peers(self.settings.swim.gossip_nodes):
            address = self._address_of(peer)
            if address is None:
                continue
            states = self.book.take(now, _STATES_PER_GOSSIP, self._swim.live_count)
            if not states:
                break  # nothing pending any more
            sends += self._state_sends(address, states)
        return sends

    def _translate_events(self, now: float) -> None:
        for event in self._swim.drain_events():
            if event.kind == "suspect":
                self.counters.suspicions += 1
            elif event.kind in ("dead", "left"):
                self.book.node_gone(now, event.member_id, event.kind)
                self._network.forget(event.member_id)
            elif event.kind in ("joined", "alive"):
                self.book.node_back(now, event.member_id)
            self._events.append(event)

    def _forget_old_pings(self, now: float) -> None:
        """Pings whose ack never came (lost, or answered through a relay) are not measured."""
        if len(self._pings) > _MAX_PENDING_PINGS:
            self._pings.clear()
        stale = [seq for seq, (_, sent_s) in self._pings.items() if now - sent_s > _PING_MEMORY_S]
        for seq in stale:
            del self._pings[seq]


def _answers(request: Message, out: Outgoing, sender: str) -> bool:
    """Whether `out` answers `request` from `sender` on its own TCP connection: the push-pull
    reply, or the ack of a TCP fallback ping."""
    if out.to != sender:
        return False
    if isinstance(out.message, PushPull):
        return isinstance(request, PushPull) and request.reply and not out.message.reply
    return isinstance(out.message, Ack) and isinstance(request, Ping)

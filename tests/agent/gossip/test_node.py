"""GossipNode without sockets: nodes wired in memory with virtual time, bytes as on the wire."""

from __future__ import annotations

import collections
import heapq
import itertools
import random
from collections.abc import Callable

import attrs
import pytest

from infermesh.agent.gossip import node as node_module
from infermesh.agent.gossip.codec import Packet, decode_packet, decode_stream, encode_packet
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.keyring import Keyring
from infermesh.agent.gossip.messages import Ack, Gossip, Ping, PushPull, Suspect
from infermesh.agent.gossip.node import GossipNode, NodeSettings, Send
from infermesh.agent.gossip.statesync import StateBook
from infermesh.agent.gossip.values import NodeMeta, StateEntry
from infermesh.core.model import GpuKey, GpuState, ModelState, TargetKey
from infermesh.core.scoring.state import StateStore

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
FAST = SwimConfig(
    probe_interval_s=0.5,
    probe_timeout_s=0.2,
    gossip_interval_s=0.1,
    push_pull_interval_s=5.0,
)


def target(node: str, model: str = "llama", running: float = 0.0) -> ModelState:
    return ModelState(
        key=TargetKey(model=model, node=node, endpoint=f"http://{node}:8000"),
        running=running,
        version=1,
    )


@attrs.define
class Mesh:
    """Gossip nodes that exchange sealed bytes through an in-memory network with latency."""

    config: SwimConfig = FAST
    latency_s: float = 0.005
    keys: tuple[bytes, ...] = (KEY,)
    now: float = 1000.0
    nodes: dict[str, GossipNode] = attrs.field(factory=dict)  # by address
    stores: dict[str, StateStore] = attrs.field(factory=dict)  # by node id
    crashed: set[str] = attrs.field(factory=set)  # addresses
    udp_lost_to: set[str] = attrs.field(factory=set)  # addresses whose inbound datagrams are lost
    sent: list[tuple[str, Send]] = attrs.field(factory=list)  # (source address, send)
    replies: list[tuple[str, Send]] = attrs.field(factory=list)  # (replier, reply on a stream)
    _queue: list[tuple[float, int, str, Send]] = attrs.field(factory=list)
    _order: itertools.count[int] = attrs.field(factory=itertools.count)

    def add(self, name: str, **settings: object) -> GossipNode:
        address = f"{name}:7946"
        store = StateStore()
        keyring = Keyring(list(self.keys)) if self.keys else None
        node_settings = NodeSettings(
            node_id=name,
            address=address,
            swim=self.config,
            meta=NodeMeta(node=name, zone=f"zone-{name}"),
            keyring=keyring,
            **settings,  # type: ignore[arg-type]
        )
        book = StateBook(name, store, epoch=1)
        node = GossipNode(node_settings, book, random.Random(name), self.now)
        self.nodes[address] = node
        self.stores[name] = store
        return node

    def send(self, source: str, sends: list[Send]) -> None:
        for send in sends:
            self.sent.append((source, send))
            heapq.heappush(
                self._queue, (self.now + self.latency_s, next(self._order), source, send)
            )

    def deliver(self, source: str, send: Send) -> None:
        node = self.nodes.get(send.address)
        if node is None or send.address in self.crashed or source in self.crashed:
            return
        if not send.stream:
            if send.address not in self.udp_lost_to:
                self.send(send.address, node.on_datagram(self.now, send.data, source))
            return
        reply, sends = node.on_stream(self.now, send.data, source)
        self.send(send.address, sends)
        if reply is not None:
            self.replies.append((send.address, Send(source, reply, True)))
            # The reply travels back on the same connection and is fed to the requester.
            heapq.heappush(
                self._queue,
                (
                    self.now + self.latency_s,
                    next(self._order),
                    send.address,
                    Send(source, reply, True),
                ),
            )

    def run_until(self, end_s: float) -> None:
        while True:
            live = [(a, n) for a, n in self.nodes.items() if a not in self.crashed]
            next_tick_s = min(n.next_deadline_s for _, n in live)
            next_message_s = self._queue[0][0] if self._queue else float("inf")
            step_s = min(next_tick_s, next_message_s)
            if step_s > end_s:
                self.now = end_s
                return
            self.now = step_s
            if next_message_s <= next_tick_s:
                _, _, source, send = heapq.heappop(self._queue)
                self.deliver(source, send)
                continue
            for address, node in live:
                if node.next_deadline_s <= self.now:
                    self.send(address, node.tick(self.now))

    def run_until_true(self, condition: Callable[[], bool], limit_s: float) -> float:
        """Advance virtual time in small steps until `condition()`; returns the time it took."""
        start = self.now
        while not condition():
            assert self.now - start < limit_s, f"condition not met within {limit_s} s"
            self.run_until(self.now + 0.05)
        return self.now - start

    def join(self, node: GossipNode, seed: GossipNode) -> None:
        self.send(node.address, node.join(self.now, [seed.address]))


def states(node: GossipNode) -> dict[str, str]:
    return {m.node: m.state for m in node.members()}


def joined_mesh(names: tuple[str, ...] = ("a", "b", "c"), **kwargs: object) -> Mesh:
    mesh = Mesh(**kwargs)  # type: ignore[arg-type]
    nodes = [mesh.add(name) for name in names]
    for node in nodes[1:]:
        mesh.join(node, nodes[0])
    everyone = dict.fromkeys(names, "alive")
    mesh.run_until_true(lambda: all(states(n) == everyone for n in nodes), limit_s=5.0)
    return mesh


def node(mesh: Mesh, name: str) -> GossipNode:
    return mesh.nodes[f"{name}:7946"]


def sealed(packet: Packet, key: bytes = KEY) -> bytes:
    plaintext, _ = encode_packet(packet)
    return Keyring([key]).seal(plaintext)


def test_nodes_join_through_a_seed_and_learn_each_others_metadata() -> None:
    mesh = joined_mesh()
    mesh.run_until(mesh.now + 2.0)

    a = node(mesh, "a")
    members = {m.node: m for m in a.members()}
    assert members["c"].address == "c:7946"
    assert members["c"].meta == NodeMeta(node="c", zone="zone-c")
    assert a.counters.probes > 0
    assert a.counters.packets_out > 0
    assert a.counters.bytes_in > 0
    assert not a.counters.dropped
    kinds = {(e.kind, e.member_id) for e in a.drain_events()}
    assert {("joined", "b"), ("joined", "c")} <= kinds


def test_a_packet_sealed_with_another_key_is_dropped_and_never_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = Mesh()
    a = mesh.add("a")
    decoded: list[bytes] = []

    def spy(data: bytes) -> Packet:
        decoded.append(data)
        return decode_packet(data)

    monkeypatch.setattr(node_module, "decode_packet", spy)
    forged = Packet("mallory", "mallory:7946", (Gossip((Suspect("a", 0, "mallory"),)),))

    assert a.on_datagram(mesh.now, sealed(forged, OTHER_KEY), "10.0.0.9:7946") == []

    assert a.counters.dropped == {"unknown_key": 1}
    assert decoded == []
    assert "mallory" not in states(a)


def test_tampered_and_malformed_packets_are_counted_by_reason() -> None:
    mesh = Mesh()
    a = mesh.add("a")
    good = sealed(Packet("b", "b:7946", (Gossip(()),)))
    tampered = good[:-1] + bytes([good[-1] ^ 1])

    a.on_datagram(mesh.now, tampered, "b:7946")
    a.on_datagram(mesh.now, Keyring([KEY]).seal(b"\xff\x00 not protobuf"), "b:7946")
    for length in (0, 5, 40):
        a.on_datagram(mesh.now, good[:length], "b:7946")

    assert a.counters.dropped["bad_seal"] >= 2
    assert a.counters.dropped["malformed"] == 1
    assert sum(a.counters.dropped.values()) == 5
    assert a.counters.packets_in == 5


def test_an_insecure_node_reads_plaintext_and_rejects_garbage() -> None:
    mesh = joined_mesh(keys=())

    assert set(states(node(mesh, "a"))) == {"a", "b", "c"}
    a = node(mesh, "a")
    a.on_datagram(mesh.now, random.Random(3).randbytes(200), "x:1")
    assert a.counters.dropped == {"malformed": 1}


def test_a_state_published_on_one_node_reaches_the_others_stores() -> None:
    mesh = joined_mesh()
    state = target("a", running=3.0)

    node(mesh, "a").publish(mesh.now, state)
    took_s = mesh.run_until_true(
        lambda: all(
            (s := mesh.stores[name].get_model(state.key)) is not None and s.running == 3.0
            for name in ("b", "c")
        ),
        limit_s=2.0,
    )

    assert took_s < 1.0
    assert mesh.stores["b"].get_model(state.key) is not None


def test_many_states_reach_the_others_although_each_datagram_carries_few() -> None:
    mesh = joined_mesh(names=("a", "b"))
    a = node(mesh, "a")
    published: list[ModelState | GpuState] = [
        target("a", model=f"model-{i:02d}-{'x' * 60}", running=i) for i in range(40)
    ]
    published += [GpuState(key=GpuKey("a", f"GPU-{i}"), index=i, version=1) for i in range(8)]

    for state in published:
        a.publish(mesh.now, state)
    mesh.run_until_true(
        lambda: (
            len(mesh.stores["b"].model_states()) == 40 and len(mesh.stores["b"].gpu_states()) == 8
        ),
        limit_s=10.0,
    )


def test_every_state_entry_taken_from_the_book_is_really_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mesh = Mesh()
    nodes = [mesh.add(name) for name in "abcdef"]
    a = nodes[0]
    taken: list[StateEntry] = []
    take = a.book.take

    def spy(now: float, max_entries: int, cluster_size: int) -> tuple[StateEntry, ...]:
        entries = take(now, max_entries, cluster_size)
        taken.extend(entries)
        return entries

    monkeypatch.setattr(a.book, "take", spy)
    for i in range(30):
        a.publish(mesh.now, target("a", model=f"model-{i:02d}-{'x' * 200}", running=i))
    # One state too large for any datagram (it goes by TCP).
    adapters = tuple(f"adapter-{i:03d}" for i in range(120))
    a.publish(mesh.now, attrs.evolve(target("a", model="lora-base"), adapters=adapters))
    for other in nodes[1:]:
        mesh.join(other, a)  # joins fill datagrams with Alive updates: little room is left
    mesh.run_until(mesh.now + 3.0)

    keyring = Keyring([KEY])
    sent: list[StateEntry] = []
    for source, send in mesh.sent:
        if source == a.address:
            plaintext = keyring.open(send.data)
            packet = decode_stream(plaintext) if send.stream else decode_packet(plaintext)
            if not any(isinstance(m, PushPull) for m in packet.messages):  # snapshots aside
                sent += packet.states
    assert taken
    sent_times = collections.Counter((e.state.key, e.version) for e in sent)
    taken_times = collections.Counter((e.state.key, e.version) for e in taken)
    assert not taken_times - sent_times  # nothing taken more often than sent


def test_push_pull_on_join_carries_the_node_states() -> None:
    mesh = Mesh()
    a, c = mesh.add("a"), mesh.add("c")
    state = target("a", running=2.0)
    a.publish(mesh.now, state)

    join = c.join(mesh.now, [a.address])
    assert [s.stream for s in join] == [True]
    reply, _ = a.on_stream(mesh.now, join[0].data, c.address)
    assert reply is not None
    c.on_stream(mesh.now, reply, a.address)

    assert states(c) == {"a": "alive", "c": "alive"}
    stored = mesh.stores["c"].get_model(state.key)
    assert stored is not None
    assert stored.running == 2.0


def test_acks_carry_coordinates_that_estimate_the_round_trip_time() -> None:
    mesh = joined_mesh(latency_s=0.01)

    mesh.run_until(mesh.now + 20.0)

    a = node(mesh, "a")
    for peer in ("b", "c"):
        rtt_s = a.rtt_s(peer)
        assert rtt_s is not None
        assert 0.01 < rtt_s < 0.04
    assert {m.node: m.rtt_s is not None for m in a.members()} == dict.fromkeys("abc", True)


def test_a_dead_member_makes_its_targets_unhealthy_in_the_other_stores() -> None:
    mesh = joined_mesh()
    state = target("b", running=1.0)
    node(mesh, "b").publish(mesh.now, state)
    mesh.run_until_true(
        lambda: (
            mesh.stores["a"].get_model(state.key) is not None
            and mesh.stores["c"].get_model(state.key) is not None
        ),
        limit_s=2.0,
    )

    mesh.crashed.add("b:7946")
    mesh.run_until_true(
        lambda: states(node(mesh, "a"))["b"] == "dead" and states(node(mesh, "c"))["b"] == "dead",
        limit_s=30.0,
    )

    for name in ("a", "c"):
        stored = mesh.stores[name].get_model(state.key)
        assert stored is not None
        assert not stored.healthy
    assert node(mesh, "a").counters.suspicions + node(mesh, "c").counters.suspicions >= 1


def test_a_restarted_node_rejoins_and_outbids_its_dead_former_life() -> None:
    mesh = joined_mesh()
    mesh.crashed.add("b:7946")
    mesh.run_until_true(lambda: states(node(mesh, "a"))["b"] == "dead", limit_s=30.0)

    mesh.crashed.discard("b:7946")
    restarted = mesh.add("b")  # same id and address, incarnation 0 again
    mesh.join(restarted, node(mesh, "c"))
    mesh.run_until_true(
        lambda: all(states(n) == dict.fromkeys("abc", "alive") for n in mesh.nodes.values()),
        limit_s=5.0,
    )

    assert restarted.swim.incarnation > 0


def test_a_node_refutes_an_accusation_and_counts_it() -> None:
    mesh = joined_mesh(names=("a", "b"))
    a = node(mesh, "a")
    before = a.swim.incarnation

    accusation = Packet("b", "b:7946", (Gossip((Suspect("a", before, "b"),)),))
    a.on_datagram(mesh.now, sealed(accusation), "b:7946")

    assert a.swim.incarnation == before + 1
    assert a.counters.refutations == 1


def test_injected_loss_drops_that_share_of_inbound_datagrams() -> None:
    mesh = Mesh()
    a = mesh.add("a", inject_loss=0.5)
    packet = sealed(Packet("b", "b:7946", (Gossip(()),)))

    for _ in range(400):
        a.on_datagram(mesh.now, packet, "b:7946")

    assert 150 < a.counters.dropped["injected_loss"] < 250
    assert set(a.counters.dropped) == {"injected_loss"}


@pytest.mark.parametrize("tcp_fallback_ping", [True, False])
def test_a_tcp_fallback_ping_travels_as_a_stream_and_its_ack_comes_back_in_the_reply(
    tcp_fallback_ping: bool,
) -> None:
    config = attrs.evolve(FAST, tcp_fallback_ping=tcp_fallback_ping)
    mesh = joined_mesh(config=config)
    a, b = node(mesh, "a"), node(mesh, "b")
    keyring = Keyring([KEY])

    mesh.udp_lost_to.add(b.address)  # b's inbound UDP is firewalled; TCP still works
    mesh.run_until(mesh.now + 10 * config.probe_interval_s)

    tcp_pings = {
        message.seq
        for source, send in mesh.sent
        if source == a.address and send.address == b.address and send.stream
        for message in decode_stream(keyring.open(send.data)).messages
        if isinstance(message, Ping)
    }
    acks_in_replies = {
        message.seq
        for replier, reply in mesh.replies
        if replier == b.address and reply.address == a.address
        for message in decode_stream(keyring.open(reply.data)).messages
        if isinstance(message, Ack)
    }
    if tcp_fallback_ping:
        assert tcp_pings
        assert acks_in_replies
        assert acks_in_replies <= tcp_pings  # (the last ones may still be on their way)
        assert states(a)["b"] == states(node(mesh, "c"))["b"] == "alive"
        assert a.counters.suspicions == 0
    else:
        assert not tcp_pings
        assert a.counters.suspicions + node(mesh, "c").counters.suspicions > 0

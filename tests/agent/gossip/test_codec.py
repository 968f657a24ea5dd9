"""The gossip wire codec: round trips, trimming to the datagram budget, and hostile input."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable, Iterator

import attrs
import pytest

from infermesh.agent.gossip.codec import (
    MAX_META_BYTES,
    MAX_PACKET_BYTES,
    MAX_PLAINTEXT_BYTES,
    MAX_STREAM_BYTES,
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
from infermesh.agent.gossip.keyring import SEAL_OVERHEAD
from infermesh.agent.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Leave,
    Message,
    Nack,
    NodeSnapshot,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Update,
)
from infermesh.agent.gossip.values import Coordinate, NodeMeta, StateEntry
from infermesh.core.model import GpuKey, GpuState, Labels, ModelState, TargetKey
from infermesh.core.proto import gossip_pb2 as pb
from infermesh.core.proto import types_pb2

ADDRESS = "10.0.0.1:7946"
META = NodeMeta(
    node="node-a",
    roles=("agent", "router"),
    zone="eu-west-1a",
    labels=(("rack", "r12"), ("tier", "gold")),
    apis=(("scoring", "10.0.0.1:50051"), ("metrics", "10.0.0.1:9100")),
    runtimes=("http://10.0.0.1:8000",),
)
UPDATES: tuple[Update, ...] = (
    Alive("node-b", 3, "10.0.0.2:7946", b"\x01meta"),
    Suspect("node-c", 1, "node-a"),
    Dead("node-d", 7, "node-b"),
    Leave("node-e", 2),
)


def model_state(node: str = "node-a", model: str = "llama-3-8b") -> ModelState:
    return ModelState(
        key=TargetKey(model=model, node=node, endpoint="http://10.0.0.1:8000"),
        labels=Labels(model=model, node=node, runtime="vllm", custom={"pool": "a"}),
        running=3,
        waiting=1,
        kv_cache_usage=0.42,
        prefix_cache_hit_rate=0.7,
        ttft_s=0.12,
        itl_s=0.02,
        e2e_s=2.5,
        prompt_tokens_per_s=1200.0,
        generation_tokens_per_s=350.0,
        max_num_seqs=256,
        adapters=("lora-a",),
        last_updated=1_700_000_000.5,
        version=17,
    )


def gpu_state(node: str = "node-a") -> GpuState:
    return GpuState(
        key=GpuKey(node=node, gpu_uuid="GPU-1234"),
        labels=Labels(node=node, gpu_uuid="GPU-1234"),
        index=1,
        name="NVIDIA H200",
        utilization=0.8,
        memory_used_bytes=40 << 30,
        memory_total_bytes=141 << 30,
        temperature_c=61.0,
        power_w=500.0,
        power_limit_w=700.0,
        clock_event_reasons=frozenset({"sw_power_cap"}),
        xid_last=13,
        last_updated=1_700_000_000.25,
        version=4,
    )


def model_entry(index: int = 0) -> StateEntry:
    return StateEntry(
        "node-a", model_state(model=f"model-{index}"), version=100 + index, age_s=0.25
    )


def packet(*messages: Message, states: tuple[StateEntry, ...] = (), **kwargs: object) -> Packet:
    return Packet("node-a", ADDRESS, messages, states, **kwargs)  # type: ignore[arg-type]


def round_trip(value: Packet) -> Packet:
    data, sent = encode_packet(value, max_bytes=MAX_STREAM_BYTES)
    assert sent == value
    return decode_stream(data)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "message",
    [
        Ping(1, "node-b", UPDATES),
        Ack(2, UPDATES),
        PingReq(3, "node-c", UPDATES),
        Nack(4, UPDATES),
        Gossip(UPDATES),
        Ping(2**64 - 1, "node-b"),
        Ack(0),
        PushPull(
            (
                NodeSnapshot("node-a", 5, "alive", ADDRESS, encode_meta(META)),
                NodeSnapshot("node-b", 1, "suspect", "[fe80::1]:7946"),
                NodeSnapshot("node-c", 2, "dead", "node-c.cluster.local:7946"),
                NodeSnapshot("node-d", 0, "left"),
            ),
            reply=True,
        ),
        PushPull((), reply=False),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_kind_round_trips(message: Message) -> None:
    sent = packet(message)
    assert round_trip(sent) == sent
    data, _ = encode_packet(sent, max_bytes=MAX_STREAM_BYTES)
    assert decode_stream(encode_stream(sent)) == sent
    if len(data) <= MAX_PACKET_BYTES:
        assert decode_packet(data) == sent


def test_state_entries_and_coordinate_round_trip() -> None:
    sent = packet(
        Ack(9),
        states=(
            model_entry(),
            StateEntry("node-a", ModelState(key=TargetKey("m", "node-a", "http://x:1")), 0, 0.0),
            StateEntry("node-a", gpu_state(), version=2**63, age_s=12.5),
        ),
        coordinate=Coordinate(
            vec=(0.001, -0.002, 0.0, 1e-9), error=1.5, adjustment=-1e-4, height=1e-5
        ),
    )
    assert round_trip(sent) == sent


def test_a_packet_may_carry_only_state_entries() -> None:
    sent = packet(states=(model_entry(),))
    assert round_trip(sent) == sent


def test_state_age_travels_in_milliseconds_and_never_negative() -> None:
    ages = [0.0004, 1.2345, -3.0, math.nan, math.inf, 1e12]
    sent = packet(Ack(1), states=tuple(attrs.evolve(model_entry(), age_s=a) for a in ages))
    received = [e.age_s for e in round_trip(sent).states]
    assert received == [0.0, 1.234, 0.0, 0.0, (2**32 - 1) / 1000, (2**32 - 1) / 1000]


def test_node_meta_round_trips() -> None:
    assert decode_meta(encode_meta(META)) == META
    assert decode_meta(encode_meta(NodeMeta(node="n"))) == NodeMeta(node="n")


def test_node_meta_over_the_size_limit_is_refused_when_encoding() -> None:
    big = NodeMeta(node="n", labels=tuple((f"k{i}", "v" * 40) for i in range(20)))
    with pytest.raises(ValueError, match=r"metadata of node 'n' encodes to \d+ bytes"):
        encode_meta(big)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "meta.node: empty"),
        (b"\xff", "malformed node metadata"),
        (pb.NodeMeta(node="n", apis=[pb.NameValue(value="x")]).SerializeToString(), "apis"),
        (pb.NodeMeta(node="n", roles=["r" * 300]).SerializeToString(), r"roles\[0\]: 300 char"),
        (b"x" * (MAX_META_BYTES + 1), "exceeds"),
    ],
)
def test_decode_meta_rejects_bad_metadata(data: bytes, error: str) -> None:
    with pytest.raises(DecodeError, match=error):
        decode_meta(data)


# --------------------------------------------------------------------------- size limits


def alive(i: int) -> Alive:
    return Alive(f"node-{i:03d}", i, f"10.0.{i // 256}.{i % 256}:7946", bytes(100))


def test_a_packet_that_fits_is_sent_whole() -> None:
    sent = packet(Ping(1, "node-b", UPDATES), states=(model_entry(),))
    data, encoded = encode_packet(sent)
    assert encoded == sent
    assert len(data) <= MAX_PLAINTEXT_BYTES
    assert decode_packet(data) == sent


def test_trimming_drops_trailing_state_entries_before_any_update() -> None:
    updates = tuple(alive(i) for i in range(3))
    states = tuple(model_entry(i) for i in range(20))
    data, encoded = encode_packet(packet(Ping(1, "node-b", updates), states=states))
    assert len(data) <= MAX_PLAINTEXT_BYTES
    assert encoded.messages == (Ping(1, "node-b", updates),)
    assert 0 < len(encoded.states) < len(states)
    assert encoded.states == states[: len(encoded.states)]
    assert decode_packet(data) == encoded


def test_trimming_drops_trailing_updates_from_the_last_message_backwards() -> None:
    first = tuple(alive(i) for i in range(5))
    second = tuple(alive(i) for i in range(5, 30))
    sent = packet(Ack(7, first), Gossip(second), states=(model_entry(),))
    data, encoded = encode_packet(sent)
    assert len(data) <= MAX_PLAINTEXT_BYTES
    assert encoded.states == ()
    assert encoded.messages[0] == Ack(7, first)
    kept = encoded.messages[1]
    assert isinstance(kept, Gossip)
    assert 0 < len(kept.updates) < len(second)
    assert kept.updates == second[: len(kept.updates)]
    assert decode_packet(data) == encoded


@pytest.mark.parametrize("max_bytes", range(60, 1400, 37))
def test_trimmed_packet_is_within_every_limit_and_keeps_the_longest_prefix(max_bytes: int) -> None:
    updates = tuple(alive(i) for i in range(8))
    states = (model_entry(0), StateEntry("node-a", gpu_state(), 1, 0.5), model_entry(1))
    sent = packet(Ping(3, "node-b", updates[:4]), Gossip(updates[4:]), states=states)
    try:
        data, encoded = encode_packet(sent, max_bytes=max_bytes)
    except PacketTooLarge:
        bare = packet(Ping(3, "node-b"), Gossip(()))
        assert len(encode_packet(bare, max_bytes=10_000)[0]) > max_bytes
        return
    assert len(data) <= max_bytes
    assert decode_stream(data) == encoded
    items = [u for m in encoded.messages for u in m.updates] + list(encoded.states)  # type: ignore[union-attr]
    everything = [*updates, *states]
    assert items == everything[: len(items)]
    if len(items) < len(everything):  # one more item would not have fitted
        one_more = _keep(sent, len(items) + 1)
        assert len(encode_packet(one_more, max_bytes=10_000)[0]) > max_bytes


def _keep(sent: Packet, count: int) -> Packet:
    messages: list[Message] = []
    for message in sent.messages:
        assert isinstance(message, Ping | Gossip)
        messages.append(attrs.evolve(message, updates=message.updates[:count]))
        count -= len(messages[-1].updates)  # type: ignore[union-attr]
    return attrs.evolve(sent, messages=tuple(messages), states=sent.states[: max(0, count)])


def test_messages_too_large_without_piggyback_raise_packet_too_large() -> None:
    snapshots = tuple(NodeSnapshot(f"node-{i}", 1, "alive", ADDRESS, bytes(64)) for i in range(40))
    big = packet(PushPull(snapshots, reply=True), states=(model_entry(),))
    with pytest.raises(PacketTooLarge, match=r"PushPull\) is \d+ bytes without piggyback"):
        encode_packet(big)
    assert decode_stream(encode_stream(big)) == big


def test_a_ping_with_eight_alive_updates_is_trimmed_to_fit_a_sealed_datagram() -> None:
    updates = tuple(
        Alive(f"node-{i:02d}", 1, f"192.168.100.{100 + i}:17946", bytes(200)) for i in range(8)
    )
    assert len(updates[0].address) == 21
    data, encoded = encode_packet(packet(Ping(1, "node-b", updates)))
    assert len(data) + SEAL_OVERHEAD <= MAX_PACKET_BYTES
    assert 4 <= len(encoded.messages[0].updates) < 8  # type: ignore[union-attr]


def test_stream_over_its_limit_is_refused_both_ways() -> None:
    with pytest.raises(DecodeError, match="exceeds"):
        decode_stream(bytes(MAX_STREAM_BYTES + 1))
    with pytest.raises(DecodeError, match="exceeds"):
        decode_packet(bytes(MAX_PACKET_BYTES + 1))
    snapshots = tuple(NodeSnapshot(f"n{i}", 1, "alive", ADDRESS, bytes(500)) for i in range(16_500))
    with pytest.raises(PacketTooLarge, match="stream message"):
        encode_stream(packet(PushPull(snapshots, reply=False)))


# --------------------------------------------------------------------------- validation


def valid_pb() -> pb.GossipPacket:
    data, _ = encode_packet(
        packet(
            Ping(1, "node-b", UPDATES),
            states=(model_entry(), StateEntry("node-a", gpu_state(), 3, 1.0)),
            coordinate=Coordinate((0.1, 0.2), 0.5, 0.0, 1e-5),
        ),
        max_bytes=MAX_STREAM_BYTES,
    )
    return pb.GossipPacket.FromString(data)


def _set(path: str, value: object) -> Callable[[pb.GossipPacket], None]:
    def mutate(msg: pb.GossipPacket) -> None:
        *parents, name = path.split(".")
        target: object = msg
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
        if isinstance(value, list):
            field = getattr(target, name)
            del field[:]
            field.extend(value)
        else:
            setattr(target, name, value)

    return mutate


def _clear(path: str) -> Callable[[pb.GossipPacket], None]:
    def mutate(msg: pb.GossipPacket) -> None:
        *parents, name = path.split(".")
        target: object = msg
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)  # type: ignore[index]
        target.ClearField(name)  # type: ignore[attr-defined]

    return mutate


def _many_messages(msg: pb.GossipPacket) -> None:
    for _ in range(64):
        msg.messages.add().CopyFrom(msg.messages[0])


def _many_updates(msg: pb.GossipPacket) -> None:
    updates = msg.messages[0].ping.updates
    for _ in range(253):
        updates.add().CopyFrom(updates[0])


def _bad_snapshot(status: int) -> Callable[[pb.GossipPacket], None]:
    def mutate(msg: pb.GossipPacket) -> None:
        pp = msg.messages.add().push_pull
        pp.states.add(member="node-x", incarnation=1, status=status)

    return mutate


def _nothing(msg: pb.GossipPacket) -> None:
    msg.ClearField("messages")
    msg.ClearField("states")


def _empty_message(msg: pb.GossipPacket) -> None:
    msg.messages.add()


def _empty_update(msg: pb.GossipPacket) -> None:
    msg.messages[0].ping.updates.add()


def _empty_state(msg: pb.GossipPacket) -> None:
    msg.states.add(origin="node-a", version=1)


def _incomplete_key(msg: pb.GossipPacket) -> None:
    msg.states[0].model.key.CopyFrom(types_pb2.TargetKey(model="m", node="node-a"))


INVALID: dict[str, tuple[Callable[[pb.GossipPacket], None], str]] = {
    "no sender": (_set("sender", ""), "no sender"),
    "long sender": (_set("sender", "n" * 257), r"^sender: 257 characters"),
    "control char in sender": (_set("sender", "node\n"), "sender: .*control"),
    "no address": (_set("sender_address", ""), "sender_address"),
    "address without port": (_set("sender_address", "10.0.0.1"), "sender_address"),
    "port 0": (_set("sender_address", "10.0.0.1:0"), "port in 1..65535"),
    "port 65536": (_set("sender_address", "10.0.0.1:65536"), "sender_address"),
    "no host": (_set("sender_address", ":7946"), "sender_address"),
    "unbracketed ipv6": (_set("sender_address", "fe80::1:7946"), "sender_address"),
    "nothing to carry": (_nothing, "neither"),
    "65 messages": (_many_messages, "messages: 65 items"),
    "257 updates": (_many_updates, r"messages\[0\].ping.updates: 257 items"),
    "message without kind": (_empty_message, r"messages\[1\]: no message kind"),
    "update without kind": (_empty_update, r"updates\[4\]: no update kind"),
    "empty target": (_set("messages.0.ping.target", ""), "ping.target: empty"),
    "empty member": (_set("messages.0.ping.updates.0.alive.member", ""), "alive.member: empty"),
    "bad alive address": (
        _set("messages.0.ping.updates.0.alive.address", "x:99999"),
        r"updates\[0\].alive.address",
    ),
    "huge meta": (_set("messages.0.ping.updates.0.alive.meta", bytes(513)), "alive.meta: 513"),
    "empty accuser": (_set("messages.0.ping.updates.1.suspect.accuser", ""), "suspect.accuser"),
    "unspecified status": (_bad_snapshot(0), "unknown member status 0"),
    "unknown status": (_bad_snapshot(99), "unknown member status 99"),
    "state entry without state": (_empty_state, r"states\[2\]: carries neither"),
    "empty origin": (_set("states.0.origin", ""), r"states\[0\].origin: empty"),
    "origin mismatch": (_set("states.1.origin", "node-z"), "must match"),
    "incomplete target key": (_incomplete_key, r"states\[0\].model: incomplete TargetKey"),
    "negative running": (_set("states.0.model.fields.running", -1.0), "running: -1.0"),
    "nan waiting": (_set("states.0.model.fields.waiting", math.nan), "waiting: nan"),
    "infinite ttft": (_set("states.0.model.fields.ttft_s", math.inf), "ttft_s: inf"),
    "negative max_num_seqs": (_set("states.0.model.fields.max_num_seqs", -5), "max_num_seqs"),
    "long health reason": (_set("states.0.model.fields.health_reason", "x" * 2000), "health"),
    "negative gpu memory": (_set("states.1.gpu.fields.memory_used_bytes", -1), "memory_used"),
    "nan temperature": (_set("states.1.gpu.fields.temperature_c", math.nan), "temperature_c"),
    "too many adapters": (_set("states.0.model.fields.adapters", ["a"] * 300), "adapters: 300"),
    "17 dimensions": (_set("coordinate.vec", [0.0] * 17), "17 dimensions"),
    "no dimensions": (_set("coordinate.vec", []), "0 dimensions"),
    "nan in vec": (_set("coordinate.vec", [0.0, math.nan]), r"vec\[1\]: nan"),
    "negative error": (_set("coordinate.error", -0.1), "coordinate.error"),
    "infinite height": (_set("coordinate.height", math.inf), "coordinate.height"),
    "negative height": (_set("coordinate.height", -1.0), "coordinate.height"),
}


@pytest.mark.parametrize("case", INVALID, ids=list(INVALID))
def test_decoding_rejects_invalid_fields_naming_what_was_wrong(case: str) -> None:
    mutate, error = INVALID[case]
    msg = valid_pb()
    mutate(msg)
    with pytest.raises(DecodeError, match=error):
        decode_stream(msg.SerializeToString())


def test_valid_addresses_are_accepted() -> None:
    for address in ("a:1", "node-1.svc.cluster.local:7946", "[::1]:65535", "[fe80::1%eth0]:7946"):
        msg = valid_pb()
        msg.sender_address = address
        assert decode_stream(msg.SerializeToString()).sender_address == address


def test_empty_bytes_are_rejected_as_a_packet_without_sender() -> None:
    with pytest.raises(DecodeError, match="no sender"):
        decode_packet(b"")


# --------------------------------------------------------------------------- fuzzing

# What each fuzz loop may see: a validated Packet or a DecodeError, nothing else escaping.


def decodes_or_rejects(data: bytes, decode: Callable[[bytes], Packet] = decode_stream) -> bool:
    try:
        result = decode(data)
    except DecodeError as exc:
        reason = str(exc)
    else:
        # Whatever passed validation is a packet this codec can send again unchanged.
        assert decode_stream(encode_stream(result)) == result
        return True
    assert reason, "a DecodeError must say what was wrong"
    return False


def sample_packets() -> Iterator[bytes]:
    yield valid_pb().SerializeToString()
    yield encode_stream(packet(Gossip(UPDATES)))
    yield encode_stream(
        packet(
            PushPull((NodeSnapshot("node-b", 1, "alive", ADDRESS, encode_meta(META)),), True),
        )
    )


def test_random_bytes_never_raise_anything_but_decode_error() -> None:
    rng = random.Random(3)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 300))
        decodes_or_rejects(data, decode_packet)


def test_every_truncation_of_a_valid_packet_is_handled() -> None:
    for data in sample_packets():
        assert decodes_or_rejects(data)
        for end in range(len(data)):
            decodes_or_rejects(data[:end])


def test_bit_flips_in_valid_packets_are_handled() -> None:
    rng = random.Random(5)
    for data in sample_packets():
        for _ in range(1500):
            flipped = bytearray(data)
            for _ in range(rng.choice((1, 1, 2, 3))):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            decodes_or_rejects(bytes(flipped))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def random_protobuf(rng: random.Random, depth: int = 0) -> bytes:
    """Well-formed protobuf wire data whose fields have random numbers, wire types and values."""
    out = bytearray()
    for _ in range(rng.randrange(0, 6)):
        field = rng.choice((1, 2, 3, 4, 5, 6, rng.randrange(1, 1000)))
        wire = rng.choice((0, 1, 2, 2, 2, 5))
        out += _varint(field << 3 | wire)
        if wire == 0:
            out += _varint(rng.choice((0, 1, 99, 2**32, 2**63, 2**64 - 1, rng.randrange(2**64))))
        elif wire == 1:
            out += struct.pack("<d", rng.choice((0.0, -1.0, math.nan, math.inf, 1e308)))
        elif wire == 5:
            out += struct.pack("<f", rng.choice((0.0, -1.0, math.nan)))
        else:
            if depth < 4 and rng.random() < 0.6:
                body = random_protobuf(rng, depth + 1)
            else:
                body = rng.choice((b"", b"node-b", b"10.0.0.1:7946", b"\xff\xfe", "é".encode()))
            out += _varint(len(body)) + body
    return bytes(out)


def test_well_formed_protobuf_with_wrong_types_and_values_raises_only_decode_error() -> None:
    rng = random.Random(7)
    # Half start with a valid sender so the random fields reach the deeper checks.
    prefix = pb.GossipPacket(sender="node-a", sender_address=ADDRESS).SerializeToString()
    for i in range(3000):
        decodes_or_rejects((prefix if i % 2 else b"") + random_protobuf(rng))


def test_valid_packets_with_random_field_values_raise_only_decode_error() -> None:
    rng = random.Random(11)
    numbers = (0, -1, 2**31 - 1, -(2**63), math.nan, -math.inf, 1e300, 0.5)
    texts = ("", "x" * 300, "a\x00b", "é", "host:70000", "[::1]:1", "n")
    template = valid_pb()
    accepted = 0
    for _ in range(1500):
        msg = pb.GossipPacket()
        msg.CopyFrom(template)
        for _ in range(rng.randrange(1, 4)):
            _randomise_one_field(rng, msg, numbers, texts)
        accepted += decodes_or_rejects(msg.SerializeToString())
    assert 0 < accepted < 1500


def _randomise_one_field(
    rng: random.Random, msg: object, numbers: tuple[float, ...], texts: tuple[str, ...]
) -> None:
    """Walk down set message fields at random and overwrite one scalar with a hostile value."""
    while True:
        fields = msg.ListFields()  # type: ignore[attr-defined]
        if not fields:
            return
        descriptor, value = rng.choice(fields)
        if (
            descriptor.message_type is not None
            and not descriptor.message_type.GetOptions().map_entry
        ):
            if descriptor.is_repeated:
                value = rng.choice(value)
            msg = value
            continue
        if descriptor.is_repeated or descriptor.message_type is not None:
            return
        try:
            if descriptor.type == descriptor.TYPE_STRING:
                setattr(msg, descriptor.name, rng.choice(texts))
            elif descriptor.type == descriptor.TYPE_BYTES:
                setattr(msg, descriptor.name, bytes(rng.choice((0, 600))))
            elif descriptor.type == descriptor.TYPE_BOOL:
                setattr(msg, descriptor.name, not value)
            elif descriptor.type in (descriptor.TYPE_DOUBLE, descriptor.TYPE_FLOAT):
                setattr(msg, descriptor.name, float(rng.choice(numbers)))
            else:
                setattr(
                    msg,
                    descriptor.name,
                    int(rng.choice([n for n in numbers if n == n and abs(n) < 1e19])),
                )
        except (ValueError, TypeError):
            pass  # out of range for this field type: the sender could not produce it either
        return

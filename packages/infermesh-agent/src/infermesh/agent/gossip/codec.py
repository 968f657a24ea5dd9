"""Gossip wire codec: `Packet` (SWIM messages, node-state entries, a coordinate) <-> protobuf.

Pure functions, no I/O. Encoding trims piggyback to fit a datagram; decoding trusts nothing from
the network: any bytes at all become a fully validated `Packet` or raise `DecodeError`, never
anything else (the limits and field checks live in `wirecheck`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs

from infermesh.agent.gossip import wirecheck as check
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
from infermesh.agent.gossip.wirecheck import MAX_META_BYTES, DecodeError
from infermesh.core.convert import (
    gpu_state_from_pb,
    gpu_state_to_pb,
    model_state_from_pb,
    model_state_to_pb,
)
from infermesh.core.model import GpuState, ModelState
from infermesh.core.proto import gossip_pb2 as pb

__all__ = [
    "MAX_META_BYTES",
    "MAX_PACKET_BYTES",
    "MAX_PLAINTEXT_BYTES",
    "MAX_STREAM_BYTES",
    "DecodeError",
    "Packet",
    "PacketTooLarge",
    "decode_meta",
    "decode_packet",
    "decode_stream",
    "encode_meta",
    "encode_packet",
    "encode_stream",
]

MAX_PACKET_BYTES = 1400  # one sealed UDP datagram (memberlist's safe size under a 1500 MTU)
MAX_PLAINTEXT_BYTES = MAX_PACKET_BYTES - SEAL_OVERHEAD
MAX_STREAM_BYTES = 8 * 1024 * 1024  # one TCP message (push-pull, large messages)
_MAX_AGE_MS = 2**32 - 1

_STATUS_TO_PB = {
    "alive": pb.MEMBER_STATUS_ALIVE,
    "suspect": pb.MEMBER_STATUS_SUSPECT,
    "dead": pb.MEMBER_STATUS_DEAD,
    "left": pb.MEMBER_STATUS_LEFT,
}
_STATUS_FROM_PB = {value: name for name, value in _STATUS_TO_PB.items()}


class PacketTooLarge(ValueError):
    """A packet exceeds its size limit even without any piggybacked updates or state entries."""


@attrs.frozen
class Packet:
    """One datagram's (or TCP message's) content: SWIM messages plus piggybacked node state."""

    sender: str  # sender member id (node id)
    sender_address: str  # sender's advertised gossip address host:port
    messages: tuple[Message, ...]  # SWIM messages (usually one)
    states: tuple[StateEntry, ...] = ()  # piggybacked node-state entries (statesync)
    coordinate: Coordinate | None = None  # sender's Vivaldi coordinate (set on acks)


# --------------------------------------------------------------------------- encoding


def encode_packet(packet: Packet, max_bytes: int = MAX_PLAINTEXT_BYTES) -> tuple[bytes, Packet]:
    """Plaintext protobuf bytes; drops trailing state entries, then trailing piggybacked
    membership updates (last message first), until it fits; returns the bytes and the Packet
    actually encoded. Raises PacketTooLarge when even the bare messages exceed `max_bytes`."""
    assemble, total = _assembler(packet)
    full = assemble(total)
    if len(full) <= max_bytes:
        return full, packet
    bare = assemble(0)
    if len(bare) > max_bytes:
        kinds = ", ".join(type(m).__name__ for m in packet.messages)
        raise PacketTooLarge(
            f"packet from {packet.sender!r} ({kinds}) is {len(bare)} bytes without piggyback, "
            f"over the {max_bytes}-byte limit: send it as a stream message"
        )
    # The size grows with every kept item, so binary-search the longest prefix that fits.
    fits, data, too_big = 0, bare, total
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        candidate = assemble(middle)
        if len(candidate) <= max_bytes:
            fits, data = middle, candidate
        else:
            too_big = middle
    return data, _trimmed(packet, fits)


def encode_stream(packet: Packet) -> bytes:
    """Protobuf bytes for one TCP message, untrimmed; PacketTooLarge over MAX_STREAM_BYTES."""
    assemble, total = _assembler(packet)
    data = assemble(total)
    if len(data) > MAX_STREAM_BYTES:
        raise PacketTooLarge(
            f"stream message from {packet.sender!r} is {len(data)} bytes, over the "
            f"{MAX_STREAM_BYTES}-byte limit"
        )
    return data


def encode_meta(meta: NodeMeta) -> bytes:
    """`Alive.meta` bytes; ValueError if they exceed MAX_META_BYTES (they must fit a datagram)."""
    msg = pb.NodeMeta(
        node=meta.node,
        roles=meta.roles,
        zone=meta.zone,
        labels=[pb.NameValue(name=k, value=v) for k, v in meta.labels],
        apis=[pb.NameValue(name=k, value=v) for k, v in meta.apis],
        runtimes=meta.runtimes,
    )
    data = msg.SerializeToString()
    if len(data) > MAX_META_BYTES:
        raise ValueError(
            f"metadata of node {meta.node!r} encodes to {len(data)} bytes, over the "
            f"{MAX_META_BYTES}-byte limit: use fewer or shorter roles, labels, apis or runtimes"
        )
    return data


def _updates_of(message: Message) -> tuple[Update, ...]:
    return () if isinstance(message, PushPull) else message.updates


def _assembler(packet: Packet) -> tuple[Callable[[int], bytes], int]:
    """A function encoding `packet` with only its first `keep` piggyback items (updates in
    message order, then state entries), and the number of such items."""
    update_pbs = [[_update_to_pb(u) for u in _updates_of(m)] for m in packet.messages]
    state_pbs = [_state_entry_to_pb(e) for e in packet.states]
    coordinate = None if packet.coordinate is None else _coordinate_to_pb(packet.coordinate)

    def assemble(keep: int) -> bytes:
        msg = pb.GossipPacket(sender=packet.sender, sender_address=packet.sender_address)
        if coordinate is not None:
            msg.coordinate.CopyFrom(coordinate)
        for message, updates in zip(packet.messages, update_pbs, strict=True):
            kept = updates[: max(0, keep)]
            keep -= len(kept)
            msg.messages.append(_message_to_pb(message, kept))
        msg.states.extend(state_pbs[: max(0, keep)])
        return msg.SerializeToString()

    return assemble, sum(len(u) for u in update_pbs) + len(state_pbs)


def _trimmed(packet: Packet, keep: int) -> Packet:
    messages: list[Message] = []
    for message in packet.messages:
        if isinstance(message, PushPull):
            messages.append(message)
            continue
        kept = message.updates[: max(0, keep)]
        keep -= len(kept)
        messages.append(attrs.evolve(message, updates=kept))
    return attrs.evolve(packet, messages=tuple(messages), states=packet.states[: max(0, keep)])


def _update_to_pb(update: Update) -> pb.MemberUpdate:
    match update:
        case Alive(member, incarnation, address, meta):
            alive = pb.MemberAlive(
                member=member, incarnation=incarnation, address=address, meta=meta
            )
            return pb.MemberUpdate(alive=alive)
        case Suspect(member, incarnation, accuser):
            suspect = pb.MemberSuspect(member=member, incarnation=incarnation, accuser=accuser)
            return pb.MemberUpdate(suspect=suspect)
        case Dead(member, incarnation, accuser):
            dead = pb.MemberDead(member=member, incarnation=incarnation, accuser=accuser)
            return pb.MemberUpdate(dead=dead)
        case Leave(member, incarnation):
            return pb.MemberUpdate(leave=pb.MemberLeave(member=member, incarnation=incarnation))
    raise TypeError(f"not a membership update: {update!r}")


def _message_to_pb(message: Message, updates: Sequence[pb.MemberUpdate]) -> pb.SwimMessage:
    match message:
        case Ping(seq, target):
            return pb.SwimMessage(ping=pb.SwimPing(seq=seq, target=target, updates=updates))
        case Ack(seq):
            return pb.SwimMessage(ack=pb.SwimAck(seq=seq, updates=updates))
        case PingReq(seq, target):
            return pb.SwimMessage(ping_req=pb.SwimPingReq(seq=seq, target=target, updates=updates))
        case Nack(seq):
            return pb.SwimMessage(nack=pb.SwimNack(seq=seq, updates=updates))
        case Gossip():
            return pb.SwimMessage(gossip=pb.SwimGossip(updates=updates))
        case PushPull(states, reply):
            snapshots = [
                pb.NodeSnapshot(
                    member=s.member,
                    incarnation=s.incarnation,
                    status=_STATUS_TO_PB[s.state],
                    address=s.address,
                    meta=s.meta,
                )
                for s in states
            ]
            return pb.SwimMessage(push_pull=pb.SwimPushPull(states=snapshots, reply=reply))
    raise TypeError(f"not a SWIM message: {message!r}")


def _state_entry_to_pb(entry: StateEntry) -> pb.GossipStateEntry:
    age_ms = 0 if math.isnan(entry.age_s) else round(min(max(entry.age_s, 0.0), 5e6) * 1000)
    msg = pb.GossipStateEntry(
        origin=entry.origin, version=entry.version, age_ms=min(age_ms, _MAX_AGE_MS)
    )
    # Derived fields (work left, headroom, health) are recomputed by the receiver: not sent.
    if isinstance(entry.state, ModelState):
        msg.model.CopyFrom(model_state_to_pb(entry.state))
        msg.model.ClearField("work_left_s")
    else:
        msg.gpu.CopyFrom(gpu_state_to_pb(entry.state))
        for derived in ("vram_headroom", "healthy", "health_reason"):
            msg.gpu.ClearField(derived)
    return msg


def _coordinate_to_pb(coordinate: Coordinate) -> pb.VivaldiCoordinate:
    return pb.VivaldiCoordinate(
        vec=coordinate.vec,
        error=coordinate.error,
        adjustment=coordinate.adjustment,
        height=coordinate.height,
    )


# --------------------------------------------------------------------------- decoding


def decode_packet(data: bytes) -> Packet:
    """A validated Packet from one datagram's plaintext; DecodeError for anything else."""
    return _decode(data, MAX_PACKET_BYTES, "packet")


def decode_stream(data: bytes) -> Packet:
    """A validated Packet from one TCP message; DecodeError for anything else."""
    return _decode(data, MAX_STREAM_BYTES, "stream message")


def decode_meta(data: bytes) -> NodeMeta:
    """A validated NodeMeta from `Alive.meta` bytes; DecodeError for anything else."""
    try:
        if len(data) > MAX_META_BYTES:
            raise DecodeError(f"node metadata of {len(data)} bytes exceeds {MAX_META_BYTES}")
        msg = pb.NodeMeta.FromString(bytes(data))
        return NodeMeta(
            node=check.identifier(msg.node, "meta.node"),
            roles=check.texts(msg.roles, "meta.roles", check.MAX_ID_CHARS),
            zone=check.text(msg.zone, "meta.zone", check.MAX_ID_CHARS),
            labels=check.pairs(msg.labels, "meta.labels"),
            apis=check.pairs(msg.apis, "meta.apis"),
            runtimes=check.texts(msg.runtimes, "meta.runtimes", check.MAX_TEXT_CHARS),
        )
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError(f"malformed node metadata: {exc}") from exc


def _decode(data: bytes, limit: int, what: str) -> Packet:
    try:
        if len(data) > limit:
            raise DecodeError(f"{what} of {len(data)} bytes exceeds the {limit}-byte limit")
        return _packet_from_pb(pb.GossipPacket.FromString(bytes(data)))
    except DecodeError:
        raise
    except Exception as exc:  # protobuf's DecodeError, UnicodeDecodeError, anything at all
        raise DecodeError(f"malformed {what}: {type(exc).__name__}: {exc}") from exc


def _packet_from_pb(msg: pb.GossipPacket) -> Packet:
    if not msg.sender:
        raise DecodeError("packet has no sender")
    if not msg.messages and not msg.states:
        raise DecodeError("packet carries neither messages nor state entries")
    sender = check.identifier(msg.sender, "sender")
    address = check.address(msg.sender_address, "sender_address")
    check.count(msg.messages, check.MAX_MESSAGES, "messages")
    check.count(msg.states, check.MAX_STATE_ENTRIES, "states")
    messages = tuple(_message_from_pb(m, f"messages[{i}]") for i, m in enumerate(msg.messages))
    states = tuple(_state_entry_from_pb(e, f"states[{i}]") for i, e in enumerate(msg.states))
    coordinate = (
        _coordinate_from_pb(msg.coordinate, "coordinate") if msg.HasField("coordinate") else None
    )
    return Packet(sender, address, messages, states, coordinate)


def _message_from_pb(msg: pb.SwimMessage, where: str) -> Message:
    kind = msg.WhichOneof("kind")
    if kind == "ping":
        return Ping(
            msg.ping.seq,
            check.identifier(msg.ping.target, f"{where}.ping.target"),
            _updates(msg.ping.updates, f"{where}.ping.updates"),
        )
    if kind == "ack":
        return Ack(msg.ack.seq, _updates(msg.ack.updates, f"{where}.ack.updates"))
    if kind == "ping_req":
        return PingReq(
            msg.ping_req.seq,
            check.identifier(msg.ping_req.target, f"{where}.ping_req.target"),
            _updates(msg.ping_req.updates, f"{where}.ping_req.updates"),
        )
    if kind == "nack":
        return Nack(msg.nack.seq, _updates(msg.nack.updates, f"{where}.nack.updates"))
    if kind == "gossip":
        return Gossip(_updates(msg.gossip.updates, f"{where}.gossip.updates"))
    if kind == "push_pull":
        snapshots = msg.push_pull.states
        check.count(snapshots, check.MAX_SNAPSHOTS, f"{where}.push_pull.states")
        return PushPull(
            tuple(
                _snapshot_from_pb(s, f"{where}.push_pull.states[{i}]")
                for i, s in enumerate(snapshots)
            ),
            msg.push_pull.reply,
        )
    raise DecodeError(f"{where}: no message kind set (unknown or missing)")


def _updates(updates: Sequence[pb.MemberUpdate], where: str) -> tuple[Update, ...]:
    check.count(updates, check.MAX_UPDATES, where)
    return tuple(_update_from_pb(u, f"{where}[{i}]") for i, u in enumerate(updates))


def _update_from_pb(msg: pb.MemberUpdate, where: str) -> Update:
    kind = msg.WhichOneof("kind")
    if kind == "alive":
        a = msg.alive
        return Alive(
            check.identifier(a.member, f"{where}.alive.member"),
            a.incarnation,
            check.optional_address(a.address, f"{where}.alive.address"),
            check.meta_bytes(a.meta, f"{where}.alive.meta"),
        )
    if kind == "suspect":
        s = msg.suspect
        return Suspect(
            check.identifier(s.member, f"{where}.suspect.member"),
            s.incarnation,
            check.identifier(s.accuser, f"{where}.suspect.accuser"),
        )
    if kind == "dead":
        d = msg.dead
        return Dead(
            check.identifier(d.member, f"{where}.dead.member"),
            d.incarnation,
            check.identifier(d.accuser, f"{where}.dead.accuser"),
        )
    if kind == "leave":
        return Leave(
            check.identifier(msg.leave.member, f"{where}.leave.member"), msg.leave.incarnation
        )
    raise DecodeError(f"{where}: no update kind set (unknown or missing)")


def _snapshot_from_pb(msg: pb.NodeSnapshot, where: str) -> NodeSnapshot:
    state = _STATUS_FROM_PB.get(msg.status)
    if state is None:
        raise DecodeError(f"{where}.status: unknown member status {msg.status}")
    return NodeSnapshot(
        check.identifier(msg.member, f"{where}.member"),
        msg.incarnation,
        state,
        check.optional_address(msg.address, f"{where}.address"),
        check.meta_bytes(msg.meta, f"{where}.meta"),
    )


def _state_entry_from_pb(msg: pb.GossipStateEntry, where: str) -> StateEntry:
    origin = check.identifier(msg.origin, f"{where}.origin")
    state: ModelState | GpuState
    kind = msg.WhichOneof("state")
    if kind not in ("model", "gpu"):
        raise DecodeError(f"{where}: carries neither a model nor a GPU state")
    try:
        state = model_state_from_pb(msg.model) if kind == "model" else gpu_state_from_pb(msg.gpu)
    except ValueError as exc:  # the converters' messages name the field
        raise DecodeError(f"{where}.{kind}: {exc}") from exc
    entry = StateEntry(origin=origin, state=state, version=msg.version, age_s=msg.age_ms / 1000)
    return check.state_entry(entry, where)


def _coordinate_from_pb(msg: pb.VivaldiCoordinate, where: str) -> Coordinate:
    coordinate = Coordinate(tuple(msg.vec), msg.error, msg.adjustment, msg.height)
    return check.coordinate(coordinate, where)

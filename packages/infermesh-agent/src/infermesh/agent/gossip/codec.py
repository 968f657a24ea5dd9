"""Gossip wire codec: `Packet` (SWIM messages, node-state entries, a coordinate) <-> protobuf.

Pure functions, no I/O. Encoding trims piggyback to fit a datagram; decoding trusts nothing from
the network: any bytes at all become a fully validated `Packet` or raise `DecodeError`, never
anything else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

import attrs

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
from infermesh.core.convert import (
    gpu_state_from_pb,
    gpu_state_to_pb,
    model_state_from_pb,
    model_state_to_pb,
)
from infermesh.core.model import GpuState, Labels, ModelState
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
MAX_META_BYTES = 512  # encoded NodeMeta, as memberlist's MetaMaxSize: must ride in any datagram

# Bounds on what a peer may send; each is far above what a healthy cluster produces.
MAX_ID_CHARS = 256
MAX_TEXT_CHARS = 1024
MAX_MESSAGES = 64  # per packet
MAX_UPDATES = 256  # per message
MAX_SNAPSHOTS = 65_536  # per push-pull: members of the cluster
MAX_STATE_ENTRIES = 65_536  # per packet or stream: targets and GPUs of the cluster
MAX_ITEMS = 256  # roles, labels, adapters, ... of one node or state
MAX_DIMENSIONS = 16  # Vivaldi coordinate vector length
_MAX_AGE_MS = 2**32 - 1

# host:port with a DNS name, IPv4 or bracketed IPv6 host (e.g. "[fe80::1%eth0]:7946").
_ADDRESS = re.compile(r"(?:\[[0-9A-Za-z:.%_-]+\]|[0-9A-Za-z._-]+):([0-9]{1,5})", re.ASCII)

_STATUS_TO_PB = {
    "alive": pb.MEMBER_STATUS_ALIVE,
    "suspect": pb.MEMBER_STATUS_SUSPECT,
    "dead": pb.MEMBER_STATUS_DEAD,
    "left": pb.MEMBER_STATUS_LEFT,
}
_STATUS_FROM_PB = {value: name for name, value in _STATUS_TO_PB.items()}

# Numeric fields a peer must send finite and >= 0 (None allowed where the model allows it).
# fmt: off
_MODEL_NON_NEGATIVE = (
    "running", "waiting", "kv_cache_usage", "prefix_cache_hit_rate", "ttft_s", "itl_s", "e2e_s",
    "prompt_tokens_per_s", "generation_tokens_per_s", "max_num_seqs", "last_updated",
)
_GPU_NON_NEGATIVE = (
    "index", "utilization", "memory_used_bytes", "memory_total_bytes", "power_w", "power_limit_w",
    "ecc_dbe_volatile", "xid_last", "last_updated",
)
# fmt: on


class DecodeError(ValueError):
    """Bytes from the network are not a valid packet; the message names what was wrong."""


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
            node=_id(msg.node, "meta.node"),
            roles=_texts(msg.roles, "meta.roles", MAX_ID_CHARS),
            zone=_text(msg.zone, "meta.zone", MAX_ID_CHARS),
            labels=_pairs(msg.labels, "meta.labels"),
            apis=_pairs(msg.apis, "meta.apis"),
            runtimes=_texts(msg.runtimes, "meta.runtimes", MAX_TEXT_CHARS),
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
    sender = _id(msg.sender, "sender")
    address = _address(msg.sender_address, "sender_address")
    _count(msg.messages, MAX_MESSAGES, "messages")
    _count(msg.states, MAX_STATE_ENTRIES, "states")
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
            _id(msg.ping.target, f"{where}.ping.target"),
            _updates(msg.ping.updates, f"{where}.ping.updates"),
        )
    if kind == "ack":
        return Ack(msg.ack.seq, _updates(msg.ack.updates, f"{where}.ack.updates"))
    if kind == "ping_req":
        return PingReq(
            msg.ping_req.seq,
            _id(msg.ping_req.target, f"{where}.ping_req.target"),
            _updates(msg.ping_req.updates, f"{where}.ping_req.updates"),
        )
    if kind == "nack":
        return Nack(msg.nack.seq, _updates(msg.nack.updates, f"{where}.nack.updates"))
    if kind == "gossip":
        return Gossip(_updates(msg.gossip.updates, f"{where}.gossip.updates"))
    if kind == "push_pull":
        snapshots = msg.push_pull.states
        _count(snapshots, MAX_SNAPSHOTS, f"{where}.push_pull.states")
        return PushPull(
            tuple(
                _snapshot_from_pb(s, f"{where}.push_pull.states[{i}]")
                for i, s in enumerate(snapshots)
            ),
            msg.push_pull.reply,
        )
    raise DecodeError(f"{where}: no message kind set (unknown or missing)")


def _updates(updates: Sequence[pb.MemberUpdate], where: str) -> tuple[Update, ...]:
    _count(updates, MAX_UPDATES, where)
    return tuple(_update_from_pb(u, f"{where}[{i}]") for i, u in enumerate(updates))


def _update_from_pb(msg: pb.MemberUpdate, where: str) -> Update:
    kind = msg.WhichOneof("kind")
    if kind == "alive":
        a = msg.alive
        return Alive(
            _id(a.member, f"{where}.alive.member"),
            a.incarnation,
            _optional_address(a.address, f"{where}.alive.address"),
            _meta_bytes(a.meta, f"{where}.alive.meta"),
        )
    if kind == "suspect":
        s = msg.suspect
        return Suspect(
            _id(s.member, f"{where}.suspect.member"),
            s.incarnation,
            _id(s.accuser, f"{where}.suspect.accuser"),
        )
    if kind == "dead":
        d = msg.dead
        return Dead(
            _id(d.member, f"{where}.dead.member"),
            d.incarnation,
            _id(d.accuser, f"{where}.dead.accuser"),
        )
    if kind == "leave":
        return Leave(_id(msg.leave.member, f"{where}.leave.member"), msg.leave.incarnation)
    raise DecodeError(f"{where}: no update kind set (unknown or missing)")


def _snapshot_from_pb(msg: pb.NodeSnapshot, where: str) -> NodeSnapshot:
    state = _STATUS_FROM_PB.get(msg.status)
    if state is None:
        raise DecodeError(f"{where}.status: unknown member status {msg.status}")
    return NodeSnapshot(
        _id(msg.member, f"{where}.member"),
        msg.incarnation,
        state,
        _optional_address(msg.address, f"{where}.address"),
        _meta_bytes(msg.meta, f"{where}.meta"),
    )


def _state_entry_from_pb(msg: pb.GossipStateEntry, where: str) -> StateEntry:
    origin = _id(msg.origin, f"{where}.origin")
    state: ModelState | GpuState
    kind = msg.WhichOneof("state")
    try:
        if kind == "model":
            state = model_state_from_pb(msg.model)
        elif kind == "gpu":
            state = gpu_state_from_pb(msg.gpu)
        else:
            raise DecodeError(f"{where}: carries neither a model nor a GPU state")
    except ValueError as exc:  # the converters' messages name the field
        raise DecodeError(f"{where}.{kind}: {exc}") from exc
    _check_state(state, f"{where}.{kind}")
    if state.key.node != origin:
        raise DecodeError(
            f"{where}: state of node {state.key.node!r} sent with origin {origin!r}: "
            "they must match"
        )
    return StateEntry(origin=origin, state=state, version=msg.version, age_s=msg.age_ms / 1000)


def _check_state(state: ModelState | GpuState, where: str) -> None:
    _id(state.key.node, f"{where}.key.node")
    _check_labels(state.labels, f"{where}.labels")
    if isinstance(state, ModelState):
        _text(state.key.model, f"{where}.key.model", MAX_TEXT_CHARS)
        _text(state.key.endpoint, f"{where}.key.endpoint", MAX_TEXT_CHARS)
        _text(state.health_reason, f"{where}.health_reason", MAX_TEXT_CHARS)
        _texts(state.adapters, f"{where}.adapters", MAX_TEXT_CHARS)
        names: tuple[str, ...] = _MODEL_NON_NEGATIVE
    else:
        _text(state.key.gpu_uuid, f"{where}.key.gpu_uuid", MAX_ID_CHARS)
        _text(state.name, f"{where}.name", MAX_TEXT_CHARS)
        _text(state.mig_profile, f"{where}.mig_profile", MAX_ID_CHARS)
        _texts(tuple(state.clock_event_reasons), f"{where}.clock_event_reasons", MAX_ID_CHARS)
        _finite(state.temperature_c, f"{where}.temperature_c")
        names = _GPU_NON_NEGATIVE
    for name in names:
        value = getattr(state, name)
        if value is not None:
            _non_negative(value, f"{where}.{name}")


def _check_labels(labels: Labels, where: str) -> None:
    for field in attrs.fields(Labels):
        if field.name != "custom":
            _text(getattr(labels, field.name), f"{where}.{field.name}", MAX_TEXT_CHARS)
    _count(labels.custom, MAX_ITEMS, f"{where}.custom")
    for name, value in labels.custom:
        _text(name, f"{where}.custom key", MAX_ID_CHARS)
        _text(value, f"{where}.custom[{name!r}]", MAX_TEXT_CHARS)


def _coordinate_from_pb(msg: pb.VivaldiCoordinate, where: str) -> Coordinate:
    if not 1 <= len(msg.vec) <= MAX_DIMENSIONS:
        raise DecodeError(f"{where}.vec: {len(msg.vec)} dimensions, expected 1..{MAX_DIMENSIONS}")
    return Coordinate(
        vec=tuple(_finite(x, f"{where}.vec[{i}]") for i, x in enumerate(msg.vec)),
        error=_non_negative(msg.error, f"{where}.error"),
        adjustment=_finite(msg.adjustment, f"{where}.adjustment"),
        height=_non_negative(msg.height, f"{where}.height"),
    )


# --------------------------------------------------------------------------- field checks

_T = TypeVar("_T")


def _count(items: Sequence[_T], limit: int, where: str) -> None:
    if len(items) > limit:
        raise DecodeError(f"{where}: {len(items)} items, more than the limit of {limit}")


def _text(value: str, where: str, limit: int) -> str:
    if len(value) > limit:
        raise DecodeError(f"{where}: {len(value)} characters, more than the limit of {limit}")
    return value


def _texts(values: Sequence[str], where: str, limit: int) -> tuple[str, ...]:
    _count(values, MAX_ITEMS, where)
    return tuple(_text(v, f"{where}[{i}]", limit) for i, v in enumerate(values))


def _pairs(pairs: Sequence[pb.NameValue], where: str) -> tuple[tuple[str, str], ...]:
    _count(pairs, MAX_ITEMS, where)
    return tuple(
        (_id(p.name, f"{where}[{i}].name"), _text(p.value, f"{where}[{i}].value", MAX_TEXT_CHARS))
        for i, p in enumerate(pairs)
    )


def _id(value: str, where: str) -> str:
    """A member/node id or name: non-empty, printable, at most MAX_ID_CHARS characters."""
    if not value:
        raise DecodeError(f"{where}: empty")
    _text(value, where, MAX_ID_CHARS)
    if not value.isprintable():
        raise DecodeError(f"{where}: {value!r} contains control or separator characters")
    return value


def _address(value: str, where: str) -> str:
    """`host:port` with port 1..65535 (IPv6 hosts in brackets)."""
    match = _ADDRESS.fullmatch(value) if len(value) <= 300 else None
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise DecodeError(f"{where}: {value[:300]!r} is not host:port with a port in 1..65535")
    return value


def _optional_address(value: str, where: str) -> str:
    return _address(value, where) if value else ""


def _meta_bytes(value: bytes, where: str) -> bytes:
    if len(value) > MAX_META_BYTES:
        raise DecodeError(f"{where}: {len(value)} bytes, more than the limit of {MAX_META_BYTES}")
    return value


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise DecodeError(f"{where}: {value} is not a finite number")
    return value


def _non_negative(value: float, where: str) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise DecodeError(f"{where}: {value} is not a finite number >= 0")
    return value

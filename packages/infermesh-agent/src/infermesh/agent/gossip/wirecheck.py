"""Limits and field checks for gossip data decoded from a peer: ids, texts, counts, numbers.

Each check returns the value it accepts or raises `DecodeError` naming the field and the limit;
it never decodes bytes, never repairs a value, and never trusts the sender.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TypeVar

import attrs

from infermesh.agent.gossip.values import Coordinate, StateEntry
from infermesh.core.model import GpuState, Labels, ModelState
from infermesh.core.proto import gossip_pb2 as pb

__all__ = [
    "MAX_DIMENSIONS",
    "MAX_ID_CHARS",
    "MAX_ITEMS",
    "MAX_MESSAGES",
    "MAX_META_BYTES",
    "MAX_SNAPSHOTS",
    "MAX_STATE_ENTRIES",
    "MAX_TEXT_CHARS",
    "MAX_UPDATES",
    "DecodeError",
    "address",
    "coordinate",
    "count",
    "finite",
    "identifier",
    "meta_bytes",
    "non_negative",
    "optional_address",
    "pairs",
    "state_entry",
    "text",
    "texts",
]

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

# host:port with a DNS name, IPv4 or bracketed IPv6 host (e.g. "[fe80::1%eth0]:7946").
_ADDRESS = re.compile(r"(?:\[[0-9A-Za-z:.%_-]+\]|[0-9A-Za-z._-]+):([0-9]{1,5})", re.ASCII)

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

_T = TypeVar("_T")


class DecodeError(ValueError):
    """Bytes from the network are not a valid packet; the message names what was wrong."""


def count(items: Sequence[_T], limit: int, where: str) -> None:
    """At most `limit` items."""
    if len(items) > limit:
        raise DecodeError(f"{where}: {len(items)} items, more than the limit of {limit}")


def text(value: str, where: str, limit: int) -> str:
    """At most `limit` characters (may be empty)."""
    if len(value) > limit:
        raise DecodeError(f"{where}: {len(value)} characters, more than the limit of {limit}")
    return value


def texts(values: Sequence[str], where: str, limit: int) -> tuple[str, ...]:
    """At most MAX_ITEMS texts of at most `limit` characters each."""
    count(values, MAX_ITEMS, where)
    return tuple(text(v, f"{where}[{i}]", limit) for i, v in enumerate(values))


def pairs(values: Sequence[pb.NameValue], where: str) -> tuple[tuple[str, str], ...]:
    """At most MAX_ITEMS (name, value) pairs: names are identifiers, values bounded texts."""
    count(values, MAX_ITEMS, where)
    return tuple(
        (
            identifier(p.name, f"{where}[{i}].name"),
            text(p.value, f"{where}[{i}].value", MAX_TEXT_CHARS),
        )
        for i, p in enumerate(values)
    )


def identifier(value: str, where: str) -> str:
    """A member/node id or name: non-empty, printable, at most MAX_ID_CHARS characters."""
    if not value:
        raise DecodeError(f"{where}: empty")
    text(value, where, MAX_ID_CHARS)
    if not value.isprintable():
        raise DecodeError(f"{where}: {value!r} contains control or separator characters")
    return value


def address(value: str, where: str) -> str:
    """`host:port` with port 1..65535 (IPv6 hosts in brackets)."""
    match = _ADDRESS.fullmatch(value) if len(value) <= 300 else None
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        raise DecodeError(f"{where}: {value[:300]!r} is not host:port with a port in 1..65535")
    return value


def optional_address(value: str, where: str) -> str:
    """An `address`, or empty."""
    return address(value, where) if value else ""


def meta_bytes(value: bytes, where: str) -> bytes:
    """Encoded node metadata of at most MAX_META_BYTES (decoded later, by whoever reads it)."""
    if len(value) > MAX_META_BYTES:
        raise DecodeError(f"{where}: {len(value)} bytes, more than the limit of {MAX_META_BYTES}")
    return value


def finite(value: float, where: str) -> float:
    """Not NaN or infinite."""
    if not math.isfinite(value):
        raise DecodeError(f"{where}: {value} is not a finite number")
    return value


def non_negative(value: float, where: str) -> float:
    """Finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise DecodeError(f"{where}: {value} is not a finite number >= 0")
    return value


def coordinate(value: Coordinate, where: str) -> Coordinate:
    """A Vivaldi coordinate: 1..MAX_DIMENSIONS finite components, error and height >= 0."""
    if not 1 <= len(value.vec) <= MAX_DIMENSIONS:
        raise DecodeError(f"{where}.vec: {len(value.vec)} dimensions, expected 1..{MAX_DIMENSIONS}")
    for i, x in enumerate(value.vec):
        finite(x, f"{where}.vec[{i}]")
    non_negative(value.error, f"{where}.error")
    finite(value.adjustment, f"{where}.adjustment")
    non_negative(value.height, f"{where}.height")
    return value


def state_entry(entry: StateEntry, where: str) -> StateEntry:
    """A node-state entry: a well-formed model or GPU state of the node it names as origin."""
    kind = "model" if isinstance(entry.state, ModelState) else "gpu"
    _check_state(entry.state, f"{where}.{kind}")
    if entry.state.key.node != entry.origin:
        raise DecodeError(
            f"{where}: state of node {entry.state.key.node!r} sent with origin "
            f"{entry.origin!r}: they must match"
        )
    return entry


def _check_state(state: ModelState | GpuState, where: str) -> None:
    identifier(state.key.node, f"{where}.key.node")
    _check_labels(state.labels, f"{where}.labels")
    if isinstance(state, ModelState):
        text(state.key.model, f"{where}.key.model", MAX_TEXT_CHARS)
        text(state.key.endpoint, f"{where}.key.endpoint", MAX_TEXT_CHARS)
        text(state.health_reason, f"{where}.health_reason", MAX_TEXT_CHARS)
        texts(state.adapters, f"{where}.adapters", MAX_TEXT_CHARS)
        names: tuple[str, ...] = _MODEL_NON_NEGATIVE
    else:
        text(state.key.gpu_uuid, f"{where}.key.gpu_uuid", MAX_ID_CHARS)
        text(state.name, f"{where}.name", MAX_TEXT_CHARS)
        text(state.mig_profile, f"{where}.mig_profile", MAX_ID_CHARS)
        texts(tuple(state.clock_event_reasons), f"{where}.clock_event_reasons", MAX_ID_CHARS)
        finite(state.temperature_c, f"{where}.temperature_c")
        names = _GPU_NON_NEGATIVE
    for name in names:
        value = getattr(state, name)
        if value is not None:
            non_negative(value, f"{where}.{name}")


def _check_labels(labels: Labels, where: str) -> None:
    for field in attrs.fields(Labels):
        if field.name != "custom":
            text(getattr(labels, field.name), f"{where}.{field.name}", MAX_TEXT_CHARS)
    count(labels.custom, MAX_ITEMS, f"{where}.custom")
    for name, value in labels.custom:
        text(name, f"{where}.custom key", MAX_ID_CHARS)
        text(value, f"{where}.custom[{name!r}]", MAX_TEXT_CHARS)

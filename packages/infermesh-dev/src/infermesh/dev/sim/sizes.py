"""Bytes on the wire for simulated SWIM messages: real codec sizes measured on a sample.

Counting only: every message is counted by type, and every `sample_every`-th one of each type is
encoded with `infermesh.agent.gossip.codec` (sealed-packet overhead added). Without the codec it
falls back to an estimate from field sizes and says so in `method`.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from infermesh.agent.gossip.messages import (
    Alive,
    Dead,
    Message,
    PushPull,
    Suspect,
    Update,
)

__all__ = ["MessageSizer", "TypeTraffic"]

# Sealed datagrams and stream messages carry version + key id + nonce + GCM tag (keyring.py).
SEAL_OVERHEAD_BYTES = 33

Encoder = Callable[[str, str, Message], int]


@attrs.frozen
class TypeTraffic:
    """Messages of one type: how many were sent, and their estimated bytes."""

    messages: int
    sampled: int
    mean_bytes: float

    @property
    def bytes(self) -> float:
        return self.messages * self.mean_bytes


def _codec_encoder() -> Encoder | None:
    try:
        from infermesh.agent.gossip import codec
    except ImportError:  # the codec is not part of this installation
        return None

    def encoded_bytes(sender: str, sender_address: str, message: Message) -> int:
        packet = codec.Packet(sender, sender_address, (message,))
        if isinstance(message, PushPull):
            return len(codec.encode_stream(packet)) + SEAL_OVERHEAD_BYTES
        data, _ = codec.encode_packet(packet)
        return len(data) + SEAL_OVERHEAD_BYTES

    return encoded_bytes


def _varint_bytes(value: int) -> int:
    return max(1, (max(0, value).bit_length() + 6) // 7)


def _field_bytes(text: str | bytes) -> int:
    return 1 + _varint_bytes(len(text)) + len(text) if text else 0


def _update_bytes(update: Update) -> int:
    size = 2 + _field_bytes(update.member) + 1 + _varint_bytes(update.incarnation)
    if isinstance(update, Alive):
        size += _field_bytes(update.address) + _field_bytes(update.meta)
    elif isinstance(update, Suspect | Dead):
        size += _field_bytes(update.accuser)
    return size


def estimated_bytes(sender: str, sender_address: str, message: Message) -> int:
    """A protobuf-like size from field lengths: tag + length + bytes per field."""
    size = _field_bytes(sender) + _field_bytes(sender_address) + SEAL_OVERHEAD_BYTES + 4
    if isinstance(message, PushPull):
        for state in message.states:
            size += 4 + _field_bytes(state.member) + 1 + _varint_bytes(state.incarnation)
            size += 2 + _field_bytes(state.address) + _field_bytes(state.meta)
        return size
    size += 2 + 1 + 8  # kind + sequence number
    size += _field_bytes(getattr(message, "target", ""))
    return size + sum(_update_bytes(update) for update in message.updates)


class MessageSizer:
    """Counts sent messages by type and measures the encoded size of a deterministic sample."""

    def __init__(self, sample_every: int = 64, *, use_codec: bool = True) -> None:
        codec_encoder = _codec_encoder() if use_codec else None
        self._encode: Encoder = codec_encoder or estimated_bytes
        self.method = "codec-sample" if codec_encoder is not None else "field-estimate"
        self._sample_every = sample_every
        self._counts: dict[str, int] = {}
        self._sampled: dict[str, int] = {}
        self._sampled_bytes: dict[str, int] = {}

    def observe(
        self, sender: str, sender_address: str, message: Message, *, kind: str | None = None
    ) -> None:
        """Count `message` under `kind` (default: its type name), sampling its size."""
        if kind is None:
            kind = type(message).__name__
        count = self._counts.get(kind, 0)
        self._counts[kind] = count + 1
        if count % self._sample_every == 0:
            size = self._encode(sender, sender_address, message)
            self._sampled[kind] = self._sampled.get(kind, 0) + 1
            self._sampled_bytes[kind] = self._sampled_bytes.get(kind, 0) + size

    def traffic(self) -> dict[str, TypeTraffic]:
        return {
            kind: TypeTraffic(
                messages=count,
                sampled=self._sampled[kind],
                mean_bytes=self._sampled_bytes[kind] / self._sampled[kind],
            )
            for kind, count in sorted(self._counts.items())
        }

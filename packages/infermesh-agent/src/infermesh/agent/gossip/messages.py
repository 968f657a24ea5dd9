"""SWIM wire vocabulary: membership updates and the probe/gossip messages that carry them.

Values only (frozen attrs classes). Encoding, sizes on the wire and encryption belong to the codec;
nothing here does I/O.
"""

from __future__ import annotations

import attrs

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "Gossip",
    "Leave",
    "Message",
    "Nack",
    "NodeSnapshot",
    "Outgoing",
    "Ping",
    "PingReq",
    "PushPull",
    "Suspect",
    "Update",
]


@attrs.frozen
class Alive:
    """`member` is alive at `incarnation` (also how a member joins or refutes a suspicion).

    `address` is where its gossip listens (`host:port`); `meta` is the opaque member metadata
    (roles, zone, labels, advertised APIs) that the shell encodes. Both ride with every `Alive`,
    so a member learned second-hand can be reached and described.
    """

    member: str
    incarnation: int
    address: str = ""
    meta: bytes = b""


@attrs.frozen
class Suspect:
    """`accuser` could not reach `member` at `incarnation`."""

    member: str
    incarnation: int
    accuser: str


@attrs.frozen
class Dead:
    """`accuser` declared `member` dead at `incarnation` after its suspicion timed out."""

    member: str
    incarnation: int
    accuser: str


@attrs.frozen
class Leave:
    """`member` left the cluster on purpose at `incarnation`."""

    member: str
    incarnation: int


Update = Alive | Suspect | Dead | Leave


@attrs.frozen
class Ping:
    """Direct probe of `target`; answered with an `Ack` carrying the same `seq`."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Ack:
    """Answer to a `Ping` (or relayed answer to a `PingReq`) with the prober's `seq`."""

    seq: int
    updates: tuple[Update, ...] = ()


@attrs.frozen
class PingReq:
    """Ask the receiver to probe `target` for us and relay the `Ack`, or a `Nack` on timeout."""

    seq: int
    target: str
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Nack:
    """The relay of `PingReq` `seq` is alive but got no answer from the target (Lifeguard)."""

    seq: int
    updates: tuple[Update, ...] = ()


@attrs.frozen
class Gossip:
    """Membership updates sent on their own every gossip interval."""

    updates: tuple[Update, ...]


@attrs.frozen
class NodeSnapshot:
    """One member as the sender sees it, for push-pull: state, incarnation, address and meta."""

    member: str
    incarnation: int
    state: str  # "alive" | "suspect" | "dead" | "left" (MemberState values)
    address: str = ""
    meta: bytes = b""


@attrs.frozen
class PushPull:
    """Full membership state for joining and anti-entropy; `reply` asks for the receiver's."""

    states: tuple[NodeSnapshot, ...]
    reply: bool


Message = Ping | Ack | PingReq | Nack | Gossip | PushPull


@attrs.frozen
class Outgoing:
    """A message the shell must send to member (or seed) `to`.

    `reliable`: send it over TCP, not as a datagram (the TCP fallback ping); the answer comes
    back on the same connection.
    """

    to: str
    message: Message
    reliable: bool = False

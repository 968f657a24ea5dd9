"""Who a Control call is for: the client certificate's identity, or the one a node forwards for.

An agent that forwards a call (LoadModel to the node that runs the model, a policy write from a
non-voter to a voter) connects with its own node certificate and names the original caller in
the `infermesh-on-behalf-of` metadata entry. Only node certificates may do that; the server then
authorizes the original caller (its ACL entry applies), never the forwarding node.
Pure: no gRPC objects here, so the rule is testable on its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

from infermesh.agent.certs import CertificateError, Identity, Role

__all__ = [
    "ON_BEHALF_OF",
    "CallerError",
    "forwarding_metadata",
    "identity_from_uri",
    "on_behalf_of",
    "resolve_caller",
]

ON_BEHALF_OF = "infermesh-on-behalf-of"
"""gRPC metadata key: the identity URI of the caller a node certificate forwards a call for."""

_URI_RE = re.compile(r"spiffe://infermesh/(?P<role>[^/]+)/(?P<name>[^/]+)")


class CallerError(Exception):
    """The call's identity cannot be accepted; `permission` False means a malformed header."""

    def __init__(self, message: str, *, permission: bool) -> None:
        super().__init__(message)
        self.permission = permission


def identity_from_uri(uri: str) -> Identity:
    """`spiffe://infermesh/<role>/<name>` as an Identity; CallerError naming what is wrong."""
    match = _URI_RE.fullmatch(uri.strip())
    if match is None:
        raise CallerError(
            f"{ON_BEHALF_OF}: {uri!r} is not an identity URI spiffe://infermesh/<role>/<name>",
            permission=False,
        )
    try:
        return Identity(name=match["name"], role=cast(Role, match["role"]))
    except CertificateError as exc:
        raise CallerError(f"{ON_BEHALF_OF}: {exc}", permission=False) from None


def on_behalf_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The forwarded identity URI in a call's metadata, if any."""
    for key, value in metadata or ():
        if key.lower() == ON_BEHALF_OF:
            return value.decode() if isinstance(value, bytes) else value
    return None


def resolve_caller(peer: Identity, forwarded_uri: str | None) -> Identity:
    """The identity to authorize: `peer` itself, or the forwarded one when `peer` is a node.

    A forwarded identity from any other certificate is refused (CallerError, permission=True):
    an operator must not be able to act as an admin by writing a header.
    """
    if forwarded_uri is None:
        return peer
    if peer.role != "node":
        raise CallerError(
            "only node certificates may act on behalf of another identity; "
            f"{peer.name}'s certificate has role {peer.role}",
            permission=True,
        )
    return identity_from_uri(forwarded_uri)


def forwarding_metadata(caller: Identity | None) -> tuple[tuple[str, str], ...]:
    """The metadata a forwarding agent sends so the next agent authorizes `caller`."""
    return () if caller is None else ((ON_BEHALF_OF, caller.uri),)

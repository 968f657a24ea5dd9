"""ASGI plumbing shared by the router's handlers: types, header filtering, body reading, replies.

Works on raw ASGI messages (no framework) to keep per-request allocations low. Never decides
where a request goes; that is `forward`'s job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import attrs

from infermesh.router.errors import ApiError, bad_request

__all__ = [
    "HOP_BY_HOP",
    "ClientDisconnected",
    "Receive",
    "RequestHeaders",
    "Scope",
    "Send",
    "read_body",
    "send_bytes",
    "send_error",
    "split_request_headers",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# RFC 9110 7.6.1 connection-specific fields, plus `host` and `content-length`, which belong to
# each hop's own connection and message framing.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)


class ClientDisconnected(Exception):
    """The client went away before its request body was read."""


@attrs.define
class RequestHeaders:
    """The request headers the router reads itself, and the ones it forwards."""

    forward: list[tuple[str, str]]
    content_length: int | None = None
    request_id: str = ""
    slo: str | None = None
    tenant: str | None = None
    traceparent: str | None = None
    """The client's `traceparent` (not forwarded as is: the router sends its own hop's)."""
    content_type: bytes = b""


def split_request_headers(
    raw: Iterable[tuple[bytes, bytes]], drop_authorization: bool = False
) -> RequestHeaders:
    """One pass over the ASGI headers (lower-case names): what to forward, what to read.

    `drop_authorization` keeps the client's `Authorization` (the router's own API key) from
    reaching runtimes. Raises a 400 for a `content-length` that is not a non-negative integer.
    """
    out = RequestHeaders(forward=[])
    forward = out.forward
    for name, value in raw:
        if name in _HOP_BY_HOP_BYTES:
            if name == b"content-length":
                try:
                    out.content_length = int(value)
                except ValueError:
                    raise bad_request("invalid Content-Length header") from None
                if out.content_length < 0:
                    raise bad_request("invalid Content-Length header")
            continue
        if name == b"traceparent":
            out.traceparent = value.decode("latin-1")
            continue
        if name == b"content-type":
            out.content_type = value
        elif name == b"authorization" and drop_authorization:
            continue
        text = value.decode("latin-1")
        if name == b"x-request-id":
            out.request_id = text
        elif name == b"x-infermesh-slo":
            out.slo = text
        elif name == b"x-infermesh-tenant":
            out.tenant = text
        forward.append((name.decode("latin-1"), text))
    return out


def too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"request body is larger than the router's limit of {limit} bytes "
        "(config key router.max_body_bytes, flag --max-body-bytes)",
        code="request_too_large",
    )


async def read_body(receive: Receive, content_length: int | None, limit: int) -> bytes:
    """The whole request body, refusing (413) as soon as it is known to exceed `limit` bytes.

    A declared Content-Length over the limit is refused before reading anything; a chunked
    body is refused on the first message that takes it over, so at most `limit` bytes plus one
    message are ever held.
    """
    if content_length is not None and content_length > limit:
        raise too_large(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected
    body: bytes = message.get("body", b"")
    if len(body) > limit:
        raise too_large(limit)
    if not message.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A complete response with a fixed-length body."""
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(
    send: Send, error: ApiError, extra_headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """`error` as OpenAI error JSON with its status and headers."""
    await send_bytes(
        send, error.status, error.body(), extra_headers=[*error.headers(), *extra_headers]
    )

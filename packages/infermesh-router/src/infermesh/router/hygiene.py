"""Request hygiene checks at the router's door: API keys, CORS, content type. Pure, no I/O.

What a client sees:
- With `router.http.api_keys_file` set, every path except `router.http.auth_exempt_paths` needs
  `Authorization: Bearer <key>` naming a key of that file; otherwise `401` with an OpenAI-style
  `invalid_api_key` error and `WWW-Authenticate: Bearer`. The router's own key is not forwarded
  to runtimes.
- With `router.http.cors_origins` set, a browser preflight (`OPTIONS` with `Origin` and
  `Access-Control-Request-Method`) from an allowed origin gets `204` with the allowed methods
  and headers; responses to allowed origins carry `Access-Control-Allow-Origin` and expose
  `x-request-id`. A preflight from another origin gets `403`.
- A POST whose `Content-Type` is neither JSON nor absent gets `415`.

`load_api_keys` is the only function that reads a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from infermesh.core.config import ConfigError
from infermesh.router.errors import ApiError

__all__ = [
    "CorsPolicy",
    "Gate",
    "HeadLimit",
    "Headers",
    "head_size",
    "load_api_keys",
]

Headers = Sequence[tuple[bytes, bytes]]

ALLOW_METHODS = b"GET, POST, OPTIONS"
PREFLIGHT_MAX_AGE = b"600"
EXPOSE_HEADERS = b"x-request-id, retry-after"
DEFAULT_ALLOW_HEADERS = b"authorization, content-type, x-request-id, x-infermesh-slo, " + (
    b"x-infermesh-tenant, traceparent, tracestate"
)


def load_api_keys(path: str) -> frozenset[str]:
    """The keys in `path`: one per line, surrounding blanks stripped, `#` comments skipped.

    Raises `ConfigError` naming `router.http.api_keys_file` when the file cannot be read or
    holds no key.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"router.http.api_keys_file: cannot read {path!r}: {exc}") from None
    keys = frozenset(
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not keys:
        raise ConfigError(f"router.http.api_keys_file: {path!r} holds no key")
    return keys


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def unauthorized(message: str) -> ApiError:
    """OpenAI's answer to a missing or wrong key."""
    return ApiError(401, message, code="invalid_api_key")


@attrs.frozen
class CorsPolicy:
    """Which browser origins may call the router (`*`: any)."""

    origins: frozenset[str] = frozenset()

    @property
    def enabled(self) -> bool:
        return bool(self.origins)

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def response_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        """Headers added to a response for a request from `origin` ([] when not allowed)."""
        if not origin or not self.allows(origin):
            return []
        value = b"*" if "*" in self.origins else origin.encode("latin-1")
        return [
            (b"access-control-allow-origin", value),
            (b"access-control-expose-headers", EXPOSE_HEADERS),
            (b"vary", b"origin"),
        ]

    def preflight(self, origin: str, request_headers: str) -> tuple[int, list[tuple[bytes, bytes]]]:
        """(status, headers) answering a preflight from `origin` asking for `request_headers`."""
        if not self.allows(origin):
            return 403, [(b"vary", b"origin")]
        allow_headers = request_headers.encode("latin-1") or DEFAULT_ALLOW_HEADERS
        return 204, [
            *self.response_headers(origin),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", allow_headers),
            (b"access-control-max-age", PREFLIGHT_MAX_AGE),
        ]


@attrs.frozen
class RequestView:
    """The few request headers the gate reads."""

    authorization: bytes = b""
    origin: str = ""
    content_type: bytes = b""
    preflight_method: str = ""
    preflight_headers: str = ""


def view_of(headers: Iterable[tuple[bytes, bytes]]) -> RequestView:
    authorization = content_type = b""
    origin = method = requested = ""
    for name, value in headers:
        if name == b"authorization":
            authorization = value
        elif name == b"origin":
            origin = value.decode("latin-1")
        elif name == b"content-type":
            content_type = value
        elif name == b"access-control-request-method":
            method = value.decode("latin-1")
        elif name == b"access-control-request-headers":
            requested = value.decode("latin-1")
    return RequestView(authorization, origin, content_type, method, requested)


@attrs.frozen
class Gate:
    """The checks every request passes before routing; an empty gate lets everything through."""

    key_digests: frozenset[bytes] = frozenset()
    exempt_paths: frozenset[str] = frozenset({"/health", "/metrics"})
    cors: CorsPolicy = CorsPolicy()

    @classmethod
    def build(
        cls, api_keys: Iterable[str], exempt_paths: Iterable[str], cors_origins: Iterable[str]
    ) -> Gate:
        return cls(
            frozenset(_digest(key.encode()) for key in api_keys),
            frozenset(exempt_paths),
            CorsPolicy(frozenset(cors_origins)),
        )

    @property
    def active(self) -> bool:
        """False when neither API keys nor CORS are configured (the app skips the gate)."""
        return bool(self.key_digests) or self.cors.enabled

    @property
    def auth(self) -> bool:
        return bool(self.key_digests)

    def is_preflight(self, method: str, view: RequestView) -> bool:
        return self.cors.enabled and method == "OPTIONS" and bool(view.preflight_method)

    def authorize(self, path: str, view: RequestView) -> None:
        """Raise a 401 unless `path` is exempt or the request carries a known Bearer key."""
        if not self.key_digests or path in self.exempt_paths:
            return
        scheme, _, token = view.authorization.partition(b" ")
        if not view.authorization:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            )
        if scheme.lower() != b"bearer" or not token.strip():
            raise unauthorized("The Authorization header must be 'Bearer <key>'.")
        if _digest(token.strip()) not in self.key_digests:
            raise unauthorized("Incorrect API key provided.")


def check_content_type(content_type: bytes) -> None:
    """Raise a 415 unless the body is declared JSON (or not declared at all)."""
    if not content_type:
        return
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"application/json" or media.endswith(b"+json"):
        return
    raise ApiError(
        415,
        f"unsupported Content-Type {media.decode('latin-1')!r}; send the request body as "
        "application/json",
        code="unsupported_media_type",
    )


def head_size(scope: Mapping[str, Any]) -> int:
    """Bytes of the request head as HTTP/1.1 would carry it: request line and header lines."""
    size = len(scope.get("raw_path") or scope["path"].encode()) + len(
        scope.get("query_string", b"")
    )
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
    return size + 16


class HeadLimit:
    """ASGI wrapper refusing request heads over `max_bytes` with 431 (WebSocket: close 1009).

    For servers that only limit heads still being received (hypercorn's h11 and h2 limits);
    uvicorn's guarded protocol measures heads itself.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind in ("http", "websocket") and head_size(scope) > self.max_bytes:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1009})
                return
            error = ApiError(
                431,
                f"request headers are larger than the router's limit of {self.max_bytes} bytes "
                "(router.http.max_header_bytes)",
                code="request_header_fields_too_large",
            )
            body = error.body()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            await send({"type": "http.response.start", "status": 431, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

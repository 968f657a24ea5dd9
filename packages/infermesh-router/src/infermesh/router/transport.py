"""The `openai-http` transport: HTTP/1.1 to OpenAI-compatible runtimes over pooled connections.

A small client of its own (asyncio protocols, httptools parsing), chosen by measurement over
aiohttp and httpx (docs/benchmarks.md): per request it writes one head, parses one response and
relays body bytes as they arrive (no decompression, no re-buffering). Keep-alive connections are
pooled per origin, up to `max_connections` in all. Never retries: the router decides whether to
try another target. Every failure to reach or read a runtime becomes `UpstreamError`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Hashable, Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

from infermesh.core.contracts import TransportContext, UpstreamError
from infermesh.router.upstream_conn import UpstreamConnection

__all__ = ["OpenAIHttpTransport", "UpstreamHttpResponse"]

# vLLM (uvicorn) closes idle keep-alive connections after 5 s; reusing one it is closing fails
# the request, so the pool drops idle connections a little earlier than the runtime does.
KEEPALIVE_S = 4.0

_URL_CACHE_MAX = 4096
# The transport frames each request itself; these request headers are never passed through.
_OWN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "expect", "te"}
)


class _Origin(NamedTuple):
    scheme: str
    host: str
    port: int


class _Target(NamedTuple):
    """A parsed URL: where to connect and what the request line and Host header say."""

    origin: _Origin
    request_target: str
    host_header: str


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _parse(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"{url}: not an http:// or https:// URL")
    default_port = 443 if scheme == "https" else 80
    try:
        port = parts.port or default_port
    except ValueError as exc:
        raise UpstreamError(f"{url}: {exc}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default_port else f"{shown}:{port}"
    return _Target(_Origin(scheme, host, port), target, host_header)


class UpstreamHttpResponse:
    """A runtime response whose headers have arrived; the body streams through `chunks()`."""

    __slots__ = ("_conn", "_pool", "raw_headers", "status", "url")

    def __init__(self, conn: UpstreamConnection, pool: _Pool, url: str) -> None:
        self._conn = conn
        self._pool = pool
        self.url = url
        self.status = conn.status
        self.raw_headers: Sequence[tuple[bytes, bytes]] = conn.headers
        """The headers as received; the router relays these without decoding them."""

    @property
    def headers(self) -> Sequence[tuple[str, str]]:
        """The headers as text (the `UpstreamResponse` contract), decoded when asked for."""
        return [
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers
        ]

    @headers.setter
    def headers(self, headers: Sequence[tuple[str, str]]) -> None:
        self.raw_headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; a connection lost mid-body raises `UpstreamError`."""
        conn = self._conn
        while True:
            chunk = conn.take()
            if chunk:
                yield chunk
            elif conn.complete:
                return
            elif conn.error or conn.closed:
                error = conn.error or "connection closed mid-response"
                raise UpstreamError(f"{self.url}: body interrupted: {error}")
            else:
                await conn.wait()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def release(self) -> None:
        """Pool the connection when the body was read to the end; otherwise close it."""
        self._pool.release(self._conn)


class _Pool:
    """Idle keep-alive connections per origin and a cap on open connections."""

    def __init__(self, context: TransportContext) -> None:
        self.context = context
        self._idle: dict[Hashable, list[UpstreamConnection]] = {}
        self._slots = asyncio.Semaphore(context.max_connections)
        self._ssl: ssl.SSLContext | None = None
        self._waiting = 0
        """Requests waiting for a free connection slot."""
        self.opened = 0

    async def acquire(self, origin: _Origin, url: str) -> UpstreamConnection:
        idle = self._idle.get(origin)
        if idle:
            now = asyncio.get_running_loop().time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                    return conn
                conn.close()
        return await self._connect(origin, url)

    async def _connect(self, origin: _Origin, url: str) -> UpstreamConnection:
        if self._slots.locked():
            self._evict_one()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        context = self.context
        try:
            async with asyncio.timeout(context.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, context.read_timeout_s, self._closed),
                    origin.host,
                    origin.port,
                    ssl=self._ssl_context() if origin.scheme == "https" else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            self._slots.release()
            raise UpstreamError(f"{url}: {_describe(exc)}") from None
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        conn.origin = origin
        return conn

    def _closed(self, conn: UpstreamConnection) -> None:
        self._slots.release()

    def _evict_one(self) -> None:
        """Close the longest-idle connection of any origin to make room for a new one."""
        oldest: list[UpstreamConnection] | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest[0].idle_since):
                oldest = conns
        if oldest:
            oldest.pop(0).close()

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def release(self, conn: UpstreamConnection) -> None:
        # With requests waiting for a slot, a connection goes back as a slot, not to the pool.
        if conn.reusable and not conn.chunks and not self._waiting:
            conn.idle_since = conn.loop.time()
            origin = conn.origin
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()


class OpenAIHttpTransport:
    """Forwards requests to runtimes by URL over pooled HTTP/1.1 connections."""

    def __init__(self, context: TransportContext) -> None:
        self.context = context
        self._pool: _Pool | None = None
        self._targets: dict[str, _Target] = {}

    def _target(self, url: str) -> _Target:
        """Parsed URLs by string: targets are few and parsing one costs more than the lookup."""
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _URL_CACHE_MAX:
                self._targets.clear()
            target = self._targets[url] = _parse(url)
        return target

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamHttpResponse:
        """Send `body` unchanged; return once the runtime's response headers arrive."""
        target = self._target(url)
        pool = self._pool
        if pool is None:
            pool = self._pool = _Pool(self.context)
        lines = [
            f"{method} {target.request_target} HTTP/1.1\r\nhost: {target.host_header}\r\n"
            f"content-length: {len(body)}\r\n"
        ]
        for name, value in headers:
            if name.lower() not in _OWN_HEADERS:
                lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise UpstreamError(f"{url}: a request header is not Latin-1 text ({exc})") from None
        conn = await pool.acquire(target.origin, url)
        try:
            conn.send(head, body)
            while not conn.head_done:
                if conn.error or conn.closed:
                    raise UpstreamError(f"{url}: {conn.error or 'connection closed'}")
                await conn.wait()
        except BaseException:
            conn.close()
            raise
        return UpstreamHttpResponse(conn, pool, url)

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

"""An aiohttp upstream transport, so the benchmark can compare it with the router's own client.

This was the router's `openai-http` transport until the benchmark showed its own client cheaper
(docs/benchmarks.md). Same contract: one ClientSession, bytes relayed as they arrive (no
decompression, no re-buffering), never a retry, every failure an `UpstreamError`. A plugin
registered as `aiohttp-http`; benchmark-only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import aiohttp
from yarl import URL

from infermesh.core.contracts import Transport, TransportContext, UpstreamError
from infermesh.core.hookspecs import RegisterTransport, hookimpl

__all__ = [
    "NAME",
    "AiohttpTransport",
    "AiohttpUpstreamResponse",
    "infermesh_register_transports",
]

NAME = "aiohttp-http"

# vLLM (uvicorn) closes idle keep-alive connections after 5 s; reusing one it is closing fails
# the request, so the pool drops idle connections a little earlier than the runtime does.
KEEPALIVE_S = 4.0

_URL_CACHE_MAX = 4096
_NETWORK_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AiohttpUpstreamResponse:
    """A runtime response whose headers have arrived; the body streams through `chunks()`."""

    __slots__ = ("_response", "headers", "status", "url")

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self._response = response
        self.url = url
        self.status = response.status
        self.headers: Sequence[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in response.raw_headers
        ]

    async def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; a connection lost mid-body raises `UpstreamError`."""
        content = self._response.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(f"{self.url}: body interrupted: {_describe(exc)}") from exc

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(f"{self.url}: body interrupted: {_describe(exc)}") from exc

    def release(self) -> None:
        """Pool the connection when the body was read to the end; otherwise close it."""
        if self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()


@hookimpl
def infermesh_register_transports(register: RegisterTransport) -> None:
    """This module is a plugin: `PluginHost.load(extra=[("bench-aiohttp", module)])`."""

    def factory(context: TransportContext) -> Transport:
        return AiohttpTransport(context)

    register(NAME, factory)


class AiohttpTransport:
    """Forwards requests to runtimes by URL over one pooled aiohttp session."""

    def __init__(self, context: TransportContext) -> None:
        self.context = context
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    def _url(self, url: str) -> URL:
        """Parsed URLs by string: targets are few and parsing one costs more than the lookup."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _URL_CACHE_MAX:
                self._urls.clear()
            parsed = self._urls[url] = URL(url)
        return parsed

    def _new_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.context.max_connections,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_S,
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self.context.connect_timeout_s,
            sock_read=self.context.read_timeout_s,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            # The client's own headers are forwarded; aiohttp must not add or override them.
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> AiohttpUpstreamResponse:
        """Send `body` unchanged; return once the runtime's response headers arrive."""
        session = self._session
        if session is None:
            session = self._session = self._new_session()
        try:
            response = await session.request(
                method, self._url(url), headers=headers, data=body, allow_redirects=False
            )
        except _NETWORK_ERRORS as exc:
            raise UpstreamError(f"{url}: {_describe(exc)}") from exc
        return AiohttpUpstreamResponse(response, url)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

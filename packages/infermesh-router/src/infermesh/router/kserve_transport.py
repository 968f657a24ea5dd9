"""The `kserve-http` transport: KServe v2 HTTP calls to Triton over pooled HTTP/1.1 connections.

KServe v2 over HTTP is plain HTTP/1.1 with JSON or binary-tensor bodies, so this transport uses
the router's own HTTP client (`OpenAIHttpTransport`) with a pool of its own, and passes bodies
and headers (`Inference-Header-Content-Length` included) through untouched. Only `GET` and
`POST` are sent (what the KServe v2 REST API uses); failures are `UpstreamError` naming Triton.
Never retries.
"""

from __future__ import annotations

from collections.abc import Sequence

from infermesh.core.contracts import TransportContext, UpstreamError
from infermesh.router.transport import OpenAIHttpTransport, UpstreamHttpResponse

__all__ = ["KServeHttpTransport"]

_METHODS = frozenset({"GET", "POST"})


class KServeHttpTransport:
    """Forwards KServe v2 HTTP requests to Triton targets by URL."""

    def __init__(self, context: TransportContext) -> None:
        self.context = context
        self._http = OpenAIHttpTransport(context)

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamHttpResponse:
        """Send `body` unchanged; return once Triton's response headers arrive."""
        if method not in _METHODS:
            raise UpstreamError(f"{url}: KServe v2 has no {method} calls (GET or POST only)")
        try:
            return await self._http.request(method, url, headers, body)
        except UpstreamError as exc:
            raise UpstreamError(f"Triton at {exc}") from None

    async def aclose(self) -> None:
        await self._http.aclose()

"""Forwarding one inference request: score, try ranked targets, relay the answer, report it.

Attempts move to the next ranked target (with a fresh reservation from `admit`) only while
nothing has been relayed to the client; once a byte is sent the response is committed. Chunks are
sent as they arrive and never buffered. Never blocks a response on outcome reporting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import NamedTuple

import attrs

from infermesh.core.contracts import (
    Transport,
    TransportContext,
    TransportFactory,
    UpstreamError,
    UpstreamResponse,
)
from infermesh.core.logging import get_logger
from infermesh.core.proto import scoring_pb2
from infermesh.router.agent_client import AgentUnavailable
from infermesh.router.asgi import HOP_BY_HOP, Message, Send
from infermesh.router.decision import Choice, Decision, RouteScoring
from infermesh.router.errors import SERVER_ERROR, ApiError, error_body
from infermesh.router.features import ParsedRequest, Route
from infermesh.router.metrics import FastHistogram, RouterMetrics
from infermesh.router.usage import UsageScanner

__all__ = ["AttemptFailed", "Exchange", "ForwardSettings", "Forwarder"]

log = get_logger(__name__)

ERROR_EXCERPT_BYTES = 512
_SSE = b"text/event-stream"
_DONE = b"data: [DONE]\n\n"
_DROPPED_RESPONSE_HEADERS = frozenset(
    name.encode() for name in (HOP_BY_HOP - {"content-length"}) | {"x-request-id"}
)


@attrs.frozen
class ForwardSettings:
    max_attempts: int = 2
    retry_after_s: float = 1.0


class AttemptFailed(Exception):
    """One target failed before anything was relayed; the message says which and how."""


@attrs.define
class Exchange:
    """One client request on its way through the router."""

    route: Route
    parsed: ParsedRequest
    body: bytes
    headers: Sequence[tuple[str, str]]
    send: Send
    request_id_header: tuple[bytes, bytes]
    arrived: float
    """perf_counter() when the request arrived."""
    upstream_path: str = ""
    """Path and query to append to a target's endpoint."""
    disconnected: asyncio.Future[Message] | None = None
    """Completes when the client goes away (streamed requests only)."""


@attrs.define
class _Attempt:
    """One try on one target, and what is reported about it."""

    target: Choice
    reservation_id: str
    started: float
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ResponseHead(NamedTuple):
    """The upstream response's headers as relayed, and what the relay needs to know of them."""

    headers: list[tuple[bytes, bytes]]
    content_length: int | None
    sse: bool


def raw_headers_of(upstream: UpstreamResponse) -> Sequence[tuple[bytes, bytes]]:
    """The response headers as bytes: as the built-in transport read them, else encoded."""
    raw: Sequence[tuple[bytes, bytes]] | None = getattr(upstream, "raw_headers", None)
    if raw is not None:
        return raw
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in upstream.headers]


def _response_head(
    upstream_headers: Sequence[tuple[bytes, bytes]], request_id_header: tuple[bytes, bytes]
) -> _ResponseHead:
    """Hop-by-hop headers and the runtime's request id dropped, ours added; one pass."""
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    sse = False
    for name, value in upstream_headers:
        lower = name.lower()
        if lower in _DROPPED_RESPONSE_HEADERS:
            continue
        if lower == b"content-length":
            content_length = int(value) if value.isdigit() else None
        elif lower == b"content-type":
            sse = value.startswith(_SSE)
        headers.append((lower, value))
    headers.append(request_id_header)
    return _ResponseHead(headers, content_length, sse)


class Forwarder:
    """Routes requests by a scoring mode's ranking to runtimes, over transport plugins."""

    def __init__(
        self,
        scoring: RouteScoring,
        transport_factories: Mapping[str, TransportFactory],
        transport_context: TransportContext,
        settings: ForwardSettings,
        metrics: RouterMetrics,
        report: Callable[[scoring_pb2.Outcome], None],
    ) -> None:
        self.scoring = scoring
        self._score_latency: FastHistogram = (
            metrics.agent_score_latency if scoring.mode == "agent" else metrics.local_score_latency
        )
        self.transport_factories = dict(transport_factories)
        self.transport_context = transport_context
        self.settings = settings
        self.metrics = metrics
        self._report = report
        self._transports: dict[str, Transport] = {}

    def transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            factory = self.transport_factories.get(name)
            if factory is None:
                known = ", ".join(sorted(self.transport_factories)) or "none"
                raise AttemptFailed(
                    f"the target needs transport {name!r}, which no installed plugin registers "
                    f"(installed: {known})"
                )
            transport = self._transports[name] = factory(self.transport_context)
        return transport

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()
        self._transports.clear()

    async def score(self, parsed: ParsedRequest) -> Decision:
        """The ranking, or the ApiError (404/503) to answer instead."""
        features = parsed.features
        started = time.perf_counter()
        try:
            decision = await self.scoring.score(features, self.settings.max_attempts)
        except AgentUnavailable as exc:
            raise ApiError(
                503,
                str(exc),
                error_type=SERVER_ERROR,
                code="agent_unavailable",
                retry_after_s=self.settings.retry_after_s,
            ) from None
        finally:
            self._score_latency.observe(time.perf_counter() - started)
        if decision.choices:
            return decision
        if not decision.model_known:
            raise ApiError(
                404,
                f"model {features.model!r} is not served by any runtime in this mesh; "
                "GET /v1/models lists the models being served",
                param="model",
                code="model_not_found",
            )
        excluded = "; ".join(decision.excluded[:5]) or "none reported"
        raise ApiError(
            503,
            f"no healthy target can serve model {features.model!r} right now "
            f"({decision.candidates} candidate(s); excluded: {excluded})",
            error_type=SERVER_ERROR,
            code="no_healthy_target",
            retry_after_s=decision.retry_after_s or self.settings.retry_after_s,
        )

    async def forward(self, exchange: Exchange) -> int:
        """Answer the request from the best target that responds; returns the status sent.

        Raises ApiError (404, 503, 502) when nothing was relayed.
        """
        parsed = exchange.parsed
        decision = await self.score(parsed)
        failures: list[str] = []
        for index, target in enumerate(decision.choices[: self.settings.max_attempts]):
            if index == 0:
                reservation_id = decision.reservation_id
            else:
                try:
                    admitted = await self.scoring.admit(parsed.features, target)
                except AgentUnavailable as exc:
                    failures.append(f"{target.target_id}: {exc}")
                    break
                if admitted.reservation_id is None:
                    failures.append(f"{target.target_id}: not admitted ({admitted.reason})")
                    continue
                reservation_id = admitted.reservation_id
            attempt = _Attempt(target, reservation_id, time.perf_counter())
            try:
                return await self._attempt(attempt, exchange)
            except AttemptFailed as exc:
                failures.append(f"{target.target_id}: {exc}")
                self.metrics.upstream_failures.labels(exchange.route.label).inc()
                log.warning(
                    "upstream attempt failed",
                    request_id=parsed.features.request_id,
                    target=target.target_id,
                    error=str(exc),
                )
        raise ApiError(
            502,
            f"no runtime answered the request for model {parsed.features.model!r}: "
            + " | ".join(failures),
            error_type=SERVER_ERROR,
            code="upstream_failed",
        )

    def _finish(self, attempt: _Attempt, parsed: ParsedRequest) -> None:
        """Close the attempt in the scoring mode and queue its outcome for the agent."""
        outcome = scoring_pb2.Outcome(
            reservation_id=attempt.reservation_id,
            target_id=attempt.target.target_id,
            request_id=parsed.features.request_id,
            ok=attempt.ok,
            status=attempt.status,
            error=attempt.error,
            ttft_s=attempt.ttft_s,
            latency_s=time.perf_counter() - attempt.started,
            prompt_tokens=attempt.prompt_tokens or parsed.features.prompt_tokens,
            completion_tokens=attempt.completion_tokens,
        )
        self.scoring.finished(outcome)
        self._report(outcome)

    async def _attempt(self, attempt: _Attempt, exchange: Exchange) -> int:
        """One target: relay its response, or raise AttemptFailed before relaying anything."""
        target = attempt.target
        try:
            transport = self.transport(target.transport)
            url = target.endpoint.rstrip("/") + exchange.upstream_path
            try:
                upstream = await transport.request("POST", url, exchange.headers, exchange.body)
            except UpstreamError as exc:
                raise AttemptFailed(str(exc)) from None
            attempt.status = upstream.status
            chunks = upstream.chunks()
            try:
                if upstream.status >= 500:
                    excerpt = await _excerpt(chunks)
                    raise AttemptFailed(f"HTTP {upstream.status}: {excerpt}")
                try:
                    first = await anext(chunks, b"")
                except UpstreamError as exc:
                    raise AttemptFailed(str(exc)) from None
                headers = raw_headers_of(upstream)
                return await self._relay(attempt, exchange, headers, first, chunks)
            finally:
                await _aclose(chunks)
                upstream.release()
        except AttemptFailed as exc:
            attempt.ok = False
            attempt.error = str(exc)
            raise
        finally:
            self._finish(attempt, exchange.parsed)

    async def _relay(
        self,
        attempt: _Attempt,
        exchange: Exchange,
        upstream_headers: Sequence[tuple[bytes, bytes]],
        first: bytes,
        chunks: AsyncIterator[bytes],
    ) -> int:
        """Send the response: headers with the first chunk, then every chunk as it arrives."""
        send = exchange.send
        route_label = exchange.route.label
        now = time.perf_counter()
        if exchange.parsed.features.stream:
            attempt.ttft_s = now - attempt.started
            self.metrics.ttft_by_route[route_label].observe(now - exchange.arrived)
        status = attempt.status
        head = _response_head(upstream_headers, exchange.request_id_header)
        sse = head.sse
        scanner = UsageScanner(stream=sse)
        disconnected = exchange.disconnected
        await send({"type": "http.response.start", "status": status, "headers": head.headers})
        # A fixed-length body ends on its last byte, without waiting to read the end of stream.
        remaining = head.content_length if head.content_length is not None else -1
        last = first
        try:
            if first:
                scanner.feed(first)
                remaining -= len(first)
                await send(
                    {"type": "http.response.body", "body": first, "more_body": remaining != 0}
                )
                if remaining != 0:
                    async for chunk in chunks:
                        scanner.feed(chunk)
                        last = chunk
                        remaining -= len(chunk)
                        more = remaining != 0
                        await send({"type": "http.response.body", "body": chunk, "more_body": more})
                        if not more:
                            break
                        if disconnected is not None and disconnected.done():
                            # Not the runtime's fault: reported ok, with nginx's "client closed".
                            attempt.ok, attempt.status = True, 499
                            attempt.error = "client disconnected"
                            return 499
            if not first or remaining != 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            attempt.ok = status < 500
        except UpstreamError as exc:
            attempt.ok = False
            attempt.error = f"failed mid-response: {exc}"
            self.metrics.midstream_failures.labels(route_label).inc()
            log.warning(
                "runtime failed mid-response",
                request_id=exchange.parsed.features.request_id,
                target=attempt.target.target_id,
                error=str(exc),
            )
            if sse:
                tail = _sse_error(str(exc), last)
                await send({"type": "http.response.body", "body": tail, "more_body": False})
            # Otherwise return with the response incomplete: the server closes the connection,
            # so the client sees a truncated response rather than a well-formed wrong one.
        finally:
            self.metrics.upstream_latency_by_route[route_label].observe(
                time.perf_counter() - attempt.started
            )
            prompt_tokens, attempt.completion_tokens = scanner.counts()
            if prompt_tokens is not None:
                attempt.prompt_tokens = prompt_tokens
        return status


async def _excerpt(chunks: AsyncIterator[bytes]) -> str:
    """The start of an error body, for the 502 message."""
    excerpt = bytearray()
    try:
        async for chunk in chunks:
            excerpt += chunk
            if len(excerpt) >= ERROR_EXCERPT_BYTES:
                break
    except UpstreamError:
        pass
    return bytes(excerpt[:ERROR_EXCERPT_BYTES]).decode("utf-8", "replace").strip()


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


def _sse_error(message: str, last_chunk: bytes) -> bytes:
    """An OpenAI-style error event and `[DONE]`, starting a fresh event if one was cut off."""
    body = error_body(
        f"the runtime failed while streaming the response: {message}",
        SERVER_ERROR,
        code="upstream_interrupted",
    )
    lead = b"" if last_chunk.endswith(b"\n\n") else b"\n\n"
    return lead + b"data: " + body + b"\n\n" + _DONE

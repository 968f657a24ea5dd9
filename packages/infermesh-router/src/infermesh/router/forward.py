"""Forwarding one inference request: score, race ranked targets, relay the answer, report it.

Attempts go to the ranked targets (skipping those whose circuit breaker is open, unless that
would leave none); each later target gets its own reservation from `admit`. Nothing is relayed
until an attempt produced its first byte (streams: the first token): the first to do so wins and
is relayed, chunks as they arrive, never buffered. Before that:

- a **hedge** (a second attempt on the next-ranked target) is sent when the first has produced
  nothing after the hedge delay (`HedgePlanner`: learnt TTFT quantile, policy, budget,
  saturation, idempotency); the attempt that loses the race is cancelled upstream (its
  connection is closed, so the runtime aborts the request) and reported as cancelled, not as a
  failure of its target;
- a **retry** on the next target follows a connect error, a 5xx or a 429 when no other attempt
  is still running, up to `max_attempts` and within the retry budget (`RetryBudget`); a 429
  that cannot be retried is relayed as it is.

Once a byte is relayed the response is committed: a runtime that dies mid-stream ends the
client's stream with an OpenAI error event and `[DONE]`. A client that disconnects cancels the
upstream request. Every attempt's outcome is reported; reporting never blocks a response.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import NamedTuple

import attrs

from infermesh.core.config import BreakerConfig, HedgingConfig, RetryConfig
from infermesh.core.contracts import (
    Transport,
    TransportContext,
    TransportFactory,
    UpstreamError,
    UpstreamResponse,
)
from infermesh.core.logging import get_logger
from infermesh.core.policy import PolicySet
from infermesh.core.proto import scoring_pb2
from infermesh.router.agent_client import AgentUnavailable
from infermesh.router.asgi import HOP_BY_HOP, Message, Send
from infermesh.router.breaker import Breakers
from infermesh.router.decision import Choice, Decision, RouteScoring
from infermesh.router.errors import SERVER_ERROR, ApiError, error_body
from infermesh.router.features import ParsedRequest, Route
from infermesh.router.hedging import IDEMPOTENT_HEADER, HedgePlan, HedgePlanner, never_saturated
from infermesh.router.metrics import FastHistogram, RouterMetrics
from infermesh.router.retry_budget import RetryBudget
from infermesh.router.usage import UsageScanner

__all__ = [
    "AttemptFailed",
    "Exchange",
    "ForwardSettings",
    "Forwarder",
    "error_excerpt",
    "raw_headers_of",
]

log = get_logger(__name__)

ERROR_EXCERPT_BYTES = 512
CLIENT_CLOSED = 499
_SSE = b"text/event-stream"
_DONE = b"data: [DONE]\n\n"
_DROPPED_RESPONSE_HEADERS = frozenset(
    name.encode() for name in (HOP_BY_HOP - {"content-length"}) | {"x-request-id"}
)
_EMPTY_POLICY = PolicySet()
_LOST_RACE = "another attempt answered first"


@attrs.frozen
class ForwardSettings:
    max_attempts: int = 2
    """Attempts per request on distinct targets after failures (hedges come on top)."""
    retry_after_s: float = 1.0
    hedging: HedgingConfig = attrs.field(factory=HedgingConfig)
    retries: RetryConfig = attrs.field(factory=RetryConfig)
    breaker: BreakerConfig = attrs.field(factory=BreakerConfig)


class AttemptFailed(Exception):
    """One target failed before anything was relayed; the message says which and how."""

    def __init__(self, message: str, reason: str = "connect", target_fault: bool = True) -> None:
        super().__init__(message)
        self.reason = reason
        """For the retry metric: connect, http_5xx, http_429, not_admitted, transport."""
        self.target_fault = target_fault
        """Whether it counts against the target's circuit breaker and the retry budget."""


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
    """Completes when the client goes away (None: not watched)."""


@attrs.define
class _Attempt:
    """One try on one target, and what is reported about it."""

    target: Choice
    reservation_id: str
    started: float
    hedge: bool = False
    ok: bool = False
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@attrs.define
class _Ready:
    """An attempt whose response head and first body chunk (possibly empty) arrived."""

    upstream: UpstreamResponse
    chunks: AsyncIterator[bytes]
    first: bytes

    async def close(self) -> None:
        """Stop reading; an unfinished response's connection is closed, aborting it upstream."""
        await _aclose(self.chunks)
        self.upstream.release()


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
        *,
        saturated: Callable[[str], bool] = never_saturated,
        policy: Callable[[], PolicySet] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scoring = scoring
        self._policy_source = policy
        self._score_latency: FastHistogram = (
            metrics.agent_score_latency if scoring.mode == "agent" else metrics.local_score_latency
        )
        self.transport_factories = dict(transport_factories)
        self.transport_context = transport_context
        self.metrics = metrics
        self._report = report
        self._transports: dict[str, Transport] = {}
        self._clock = clock
        self._saturated = saturated
        self.settings = settings
        self.hedger = HedgePlanner(settings.hedging, saturated)
        self.retry_budget = RetryBudget(settings.retries)
        self.breakers = Breakers(settings.breaker, self._breaker_moved)

    def configure(
        self,
        *,
        hedging: HedgingConfig | None = None,
        retries: RetryConfig | None = None,
        breaker: BreakerConfig | None = None,
        saturated: Callable[[str], bool] | None = None,
    ) -> None:
        """Replace the hedging, retry-budget and breaker settings (`[router.*]` tables) and the
        saturation signal (a callable: model -> whether the fleet serving it is saturated)."""
        if saturated is not None:
            self._saturated = saturated
        settings = self.settings
        self.settings = attrs.evolve(
            settings,
            hedging=hedging or settings.hedging,
            retries=retries or settings.retries,
            breaker=breaker or settings.breaker,
        )
        self.hedger = HedgePlanner(self.settings.hedging, self._saturated)
        self.retry_budget = RetryBudget(self.settings.retries)
        self.breakers = Breakers(self.settings.breaker, self._breaker_moved)

    def _breaker_moved(self, target: str, to_state: str) -> None:
        self.metrics.breaker_transitions.labels(target, to_state).inc()
        log.info("circuit breaker", target=target, state=to_state)

    def _policy(self) -> PolicySet:
        """The operator policy in force: from `policy` when given (the admission gate's, which
        polls the agent in agent scoring mode too), else the local scoring's policy watcher."""
        if self._policy_source is not None:
            return self._policy_source()
        watcher = getattr(self.scoring, "policy_watcher", None)
        policy = getattr(watcher, "policy", None)
        return policy if isinstance(policy, PolicySet) else _EMPTY_POLICY

    def transport(self, name: str) -> Transport:
        transport = self._transports.get(name)
        if transport is None:
            factory = self.transport_factories.get(name)
            if factory is None:
                known = ", ".join(sorted(self.transport_factories)) or "none"
                raise AttemptFailed(
                    f"the target needs transport {name!r}, which no installed plugin registers "
                    f"(installed: {known})",
                    reason="transport",
                    target_fault=False,
                )
            transport = self._transports[name] = factory(self.transport_context)
        return transport

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()
        self._transports.clear()

    async def score(self, parsed: ParsedRequest, max_targets: int | None = None) -> Decision:
        """The ranking, or the ApiError (404/503) to answer instead."""
        features = parsed.features
        started = time.perf_counter()
        try:
            decision = await self.scoring.score(
                features, max_targets if max_targets is not None else self.settings.max_attempts
            )
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
        """Answer the request from the first target that responds; returns the status sent.

        Raises ApiError (404, 503, 502) when nothing was relayed.
        """
        features = exchange.parsed.features
        slo = features.slo_class.value
        plan = self.hedger.plan(
            features.model,
            features.slo_class,
            features.prompt_tokens,
            _idempotent(exchange.headers),
            self._policy(),
        )
        try:
            decision = await self.score(
                exchange.parsed, self.settings.max_attempts + plan.max_hedges
            )
        except ApiError as error:
            outcome = {404: "unknown_model"}.get(error.status, error.code or "no_target")
            model = self.metrics.model_label(features.model) if error.status != 404 else "other"
            self.metrics.count_outcome(model, slo, outcome)
            raise
        race = _Race(self, exchange, decision, plan)
        try:
            status = await race.run()
        except ApiError:
            race.outcome = "upstream_failed"
            raise
        except BaseException:
            if race.outcome == "ok":
                race.outcome = "client_disconnected"  # the client left (or the server stops)
            raise
        finally:
            model = self.metrics.model_label(features.model)
            self.metrics.count_outcome(model, slo, race.outcome)
            _, _, e2e = self.metrics.histograms((model, slo))
            e2e.observe(time.perf_counter() - exchange.arrived)
        return status

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

    def _release_unused(self, reservation_id: str, parsed: ParsedRequest, why: str) -> None:
        """Close a reservation on a target that was skipped (no attempt, nothing to learn)."""
        outcome = scoring_pb2.Outcome(
            reservation_id=reservation_id,
            request_id=parsed.features.request_id,
            ok=True,
            error=why,
        )
        self.scoring.finished(outcome)
        self._report(outcome)

    async def _open(self, attempt: _Attempt, exchange: Exchange, admit: bool) -> _Ready:
        """Send one attempt and wait for its first body chunk; AttemptFailed before that.

        Cancelled (a lost race, a client gone) it closes its upstream connection on the way out.
        """
        target = attempt.target
        if admit:
            try:
                admitted = await self.scoring.admit(exchange.parsed.features, target)
            except AgentUnavailable as exc:
                raise AttemptFailed(str(exc), reason="not_admitted", target_fault=False) from None
            if admitted.reservation_id is None:
                raise AttemptFailed(
                    f"not admitted ({admitted.reason})", reason="not_admitted", target_fault=False
                )
            attempt.reservation_id = admitted.reservation_id
            attempt.started = time.perf_counter()
        transport = self.transport(target.transport)
        url = target.endpoint.rstrip("/") + exchange.upstream_path
        try:
            upstream = await transport.request("POST", url, exchange.headers, exchange.body)
        except UpstreamError as exc:
            raise AttemptFailed(str(exc)) from None
        attempt.status = upstream.status
        chunks = upstream.chunks()
        ready = False
        try:
            if upstream.status >= 500:
                excerpt = await error_excerpt(chunks)
                raise AttemptFailed(f"HTTP {upstream.status}: {excerpt}", reason="http_5xx")
            try:
                first = await anext(chunks, b"")
            except UpstreamError as exc:
                raise AttemptFailed(str(exc)) from None
            ready = True
            return _Ready(upstream, chunks, first)
        finally:
            if not ready:
                await _aclose(chunks)
                upstream.release()

    async def _relay(
        self,
        attempt: _Attempt,
        exchange: Exchange,
        ready: _Ready,
    ) -> int:
        """Send the response: headers with the first chunk, then every chunk as it arrives."""
        send = exchange.send
        route_label = exchange.route.label
        features = exchange.parsed.features
        now = time.perf_counter()
        model = self.metrics.model_label(features.model)
        ttft, itl, _ = self.metrics.histograms((model, features.slo_class.value))
        ttft.observe(now - exchange.arrived)
        first_byte_s = now - attempt.started
        if attempt.status < 400:
            self.hedger.observe_ttft(features.model, features.prompt_tokens, first_byte_s)
        if features.stream:
            attempt.ttft_s = first_byte_s  # reported to the agent for streams only
            self.metrics.ttft_by_route[route_label].observe(now - exchange.arrived)
        status = attempt.status
        head = _response_head(raw_headers_of(ready.upstream), exchange.request_id_header)
        sse = head.sse
        scanner = UsageScanner(stream=sse)
        disconnected = exchange.disconnected
        first, chunks = ready.first, ready.chunks
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
                    previous = time.perf_counter()
                    async for chunk in chunks:
                        if sse:
                            arrived = time.perf_counter()
                            itl.observe(arrived - previous)
                            previous = arrived
                        scanner.feed(chunk)
                        last = chunk
                        remaining -= len(chunk)
                        more = remaining != 0
                        await send({"type": "http.response.body", "body": chunk, "more_body": more})
                        if not more:
                            break
                        if disconnected is not None and disconnected.done():
                            # Not the runtime's fault: reported ok, with nginx's "client closed".
                            attempt.ok, attempt.status = True, CLIENT_CLOSED
                            attempt.error = "client disconnected"
                            return CLIENT_CLOSED
            if not first or remaining != 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            attempt.ok = status < 500
        except UpstreamError as exc:
            attempt.ok = False
            attempt.error = f"failed mid-response: {exc}"
            self.metrics.midstream_failures.labels(route_label).inc()
            log.warning(
                "runtime failed mid-response",
                request_id=features.request_id,
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


class _Race:
    """The attempts of one request: first, hedges and retries, until one answers or all fail."""

    def __init__(
        self, forwarder: Forwarder, exchange: Exchange, decision: Decision, plan: HedgePlan
    ) -> None:
        self.f = forwarder
        self.exchange = exchange
        self.decision = decision
        self.plan = plan
        self.outcome = "ok"
        """How the request ended, for `infermesh_router_outcomes`."""
        self.pending: dict[asyncio.Task[_Ready], _Attempt] = {}
        self.failures: list[str] = []
        self.sequential = 0
        """Attempts sent as the first or as retries (hedges not counted)."""
        self.hedges = 0
        now = forwarder._clock()
        breakers = forwarder.breakers
        choices = decision.choices
        usable = [c for c in choices if breakers.available(c.target_id, now)]
        if not usable:
            usable = [choices[0]]  # never eject the last target: try it anyway
        self.candidates: deque[Choice] = deque(usable)
        self._first_reserved = usable[0] == choices[0]
        if not self._first_reserved:
            forwarder._release_unused(
                decision.reservation_id, exchange.parsed, "not sent: circuit breaker open"
            )

    def _start(self, hedge: bool) -> None:
        target = self.candidates.popleft()
        first = not self.pending and not self.failures and self.sequential == 0 and not hedge
        reserved = first and self._first_reserved
        attempt = _Attempt(
            target, self.decision.reservation_id if reserved else "", time.perf_counter(), hedge
        )
        self.f.breakers.acquire(target.target_id, self.f._clock())
        if hedge:
            self.hedges += 1
            self.f.metrics.hedges["fired"] += 1
        else:
            self.sequential += 1
        task = asyncio.ensure_future(self.f._open(attempt, self.exchange, admit=not reserved))
        self.pending[task] = attempt

    def _may_retry(self, reason: str) -> bool:
        f = self.f
        if not self.candidates or self.sequential >= f.settings.max_attempts:
            return False
        if not f.retry_budget.allows_retry():
            f.metrics.retries_denied += 1
            return False
        f.metrics.count_retry(reason)
        return True

    def _failed(self, attempt: _Attempt, exc: AttemptFailed) -> None:
        f = self.f
        parsed = self.exchange.parsed
        attempt.ok = False
        attempt.error = str(exc)
        if exc.target_fault:
            f.retry_budget.on_failure()
            f.breakers.record(attempt.target.target_id, False, f._clock())
        else:
            f.breakers.release(attempt.target.target_id)
        self.failures.append(f"{attempt.target.target_id}: {exc}")
        f.metrics.upstream_failures.labels(self.exchange.route.label).inc()
        log.warning(
            "upstream attempt failed",
            request_id=parsed.features.request_id,
            target=attempt.target.target_id,
            error=str(exc),
        )
        f._finish(attempt, parsed)

    async def run(self) -> int:
        f = self.f
        plan = self.plan
        model = self.exchange.parsed.features.model
        disconnected = self.exchange.disconnected
        loop = asyncio.get_running_loop()
        self._start(hedge=False)
        hedge_at = loop.time() + plan.delay_s if plan.enabled else math.inf
        held: tuple[_Attempt, _Ready] | None = None
        """A 429 answer kept to relay if no other target answers."""
        last_reason = "connect"
        try:
            while True:
                if not self.pending:
                    if held is None and self._may_retry(last_reason):
                        self._start(hedge=False)
                        continue
                    if held is not None and self._may_retry("http_429"):
                        await self._abandon(*held, "rate limited; retried elsewhere")
                        held = None
                        self._start(hedge=False)
                        continue
                    break
                can_hedge = self.hedges < plan.max_hedges and bool(self.candidates)
                timeout = max(0.0, hedge_at - loop.time()) if can_hedge else None
                waiting: set[asyncio.Future[object]] = set(self.pending)  # type: ignore[arg-type]
                if disconnected is not None:
                    waiting.add(disconnected)  # type: ignore[arg-type]
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if disconnected is not None and disconnected.done():
                    self.outcome = "client_disconnected"
                    await self._cancel_all("client disconnected")
                    if held is not None:
                        await self._abandon(*held, "client disconnected")
                    return CLIENT_CLOSED
                if not done:
                    denied = f.hedger.may_fire(model)
                    if denied:
                        f.metrics.hedges[
                            "denied_by_budget" if denied == "budget" else "denied_saturated"
                        ] += 1
                        hedge_at = math.inf
                    else:
                        self._start(hedge=True)
                        hedge_at = loop.time() + plan.delay_s
                    continue
                winner: tuple[_Attempt, _Ready] | None = None
                for task in done:
                    attempt = self.pending.pop(task)  # type: ignore[call-overload]
                    try:
                        ready: _Ready = task.result()  # type: ignore[assignment]
                    except AttemptFailed as exc:
                        last_reason = exc.reason
                        self._failed(attempt, exc)
                        continue
                    if winner is not None:
                        await self._abandon(attempt, ready, _LOST_RACE)
                    elif attempt.status == 429 and (self.pending or self._retry_possible()):
                        f.retry_budget.on_failure()
                        f.breakers.release(attempt.target.target_id)
                        if held is not None:
                            await self._abandon(*held, "rate limited")
                        held = (attempt, ready)
                    else:
                        winner = (attempt, ready)
                if winner is not None:
                    if held is not None:
                        await self._abandon(*held, "rate limited; another target answered")
                        held = None
                    await self._cancel_all(_LOST_RACE)
                    return await self._relay(*winner)
        except BaseException:
            await self._cancel_all("request cancelled")
            if held is not None:
                await self._abandon(*held, "request cancelled")
            raise
        if held is not None:
            return await self._relay(*held)
        parsed = self.exchange.parsed
        raise ApiError(
            502,
            f"no runtime answered the request for model {parsed.features.model!r}: "
            + " | ".join(self.failures),
            error_type=SERVER_ERROR,
            code="upstream_failed",
        )

    def _retry_possible(self) -> bool:
        return (
            bool(self.candidates)
            and self.sequential < self.f.settings.max_attempts
            and self.f.retry_budget.allows_retry()
        )

    async def _relay(self, attempt: _Attempt, ready: _Ready) -> int:
        f = self.f
        parsed = self.exchange.parsed
        target = attempt.target.target_id
        f.metrics.count_choice(target)
        if attempt.hedge:
            f.metrics.hedges["won"] += 1
        try:
            status = await f._relay(attempt, self.exchange, ready)
        except BaseException:
            attempt.ok, attempt.status = True, CLIENT_CLOSED
            attempt.error = attempt.error or "client disconnected"
            raise
        finally:
            await ready.close()
            if attempt.status == CLIENT_CLOSED:
                self.outcome = "client_disconnected"
                f.breakers.release(target)
            elif not attempt.ok:
                self.outcome = "midstream_failure"
                f.retry_budget.on_failure()
                f.breakers.record(target, False, f._clock())
            else:
                f.retry_budget.on_success()
                f.breakers.record(target, True, f._clock())
                if attempt.status == 429:
                    self.outcome = "rate_limited"
                elif attempt.status >= 400:
                    self.outcome = "client_error"
            f._finish(attempt, parsed)
        return status

    async def _abandon(self, attempt: _Attempt, ready: _Ready, why: str) -> None:
        """Close an answer that will not be relayed (its connection is dropped)."""
        await ready.close()
        if attempt.status != 429:
            self.f.breakers.release(attempt.target.target_id)
            attempt.ok, attempt.status = True, CLIENT_CLOSED
            if why == _LOST_RACE:
                self.f.metrics.hedges["cancelled"] += 1
        else:
            attempt.ok = False
        attempt.error = f"cancelled: {why}" if attempt.ok else f"HTTP 429: {why}"
        self.f._finish(attempt, self.exchange.parsed)

    async def _cancel_all(self, why: str) -> None:
        """Cancel every running attempt: each closes its upstream connection (the runtime sees
        the disconnect and aborts); reported as cancelled, not as failures of their targets."""
        if not self.pending:
            return
        lost_race = why == _LOST_RACE
        tasks = list(self.pending.items())
        self.pending.clear()
        for task, _ in tasks:
            task.cancel()
        await asyncio.gather(*(task for task, _ in tasks), return_exceptions=True)
        for task, attempt in tasks:
            if not task.cancelled() and task.exception() is None:
                await task.result().close()
            self.f.breakers.release(attempt.target.target_id)
            if lost_race:
                self.f.metrics.hedges["cancelled"] += 1
            attempt.ok, attempt.status = True, CLIENT_CLOSED
            attempt.error = f"cancelled: {why}"
            self.f._finish(attempt, self.exchange.parsed)


def _idempotent(headers: Sequence[tuple[str, str]]) -> bool:
    """False when the client sent `x-infermesh-idempotent: false` (never hedge it)."""
    for name, value in headers:
        if name == IDEMPOTENT_HEADER:
            return value.strip().lower() not in ("false", "0", "no")
    return True


async def error_excerpt(chunks: AsyncIterator[bytes]) -> str:
    """The start of an error body (up to ERROR_EXCERPT_BYTES), for the 502 message."""
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

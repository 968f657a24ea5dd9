"""The router's ASGI application: OpenAI-compatible endpoints, health and metrics, no framework.

Dispatches on the exact path, reads and validates the request, hands inference requests to the
`Forwarder` and answers everything else itself. Owns the lifecycle (lifespan) of the agent
channel, the scoring mode, the transports and the outcome reporter. Never buffers a streamed
response.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping

import attrs
import orjson

from infermesh.core.config import AdmissionConfig
from infermesh.core.contracts import TransportContext, TransportFactory
from infermesh.core.proto import scoring_pb2
from infermesh.router.admission_gate import AdmissionGate
from infermesh.router.agent_client import AgentUnavailable
from infermesh.router.asgi import (
    ClientDisconnected,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
    send_error,
    split_request_headers,
)
from infermesh.router.decision import RouteScoring
from infermesh.router.errors import SERVER_ERROR, ApiError
from infermesh.router.features import Route, parse_request
from infermesh.router.forward import Exchange, Forwarder, ForwardSettings
from infermesh.router.hygiene import Gate, check_content_type, view_of
from infermesh.router.kserve import KServeIngress, KServeSettings, is_kserve_path
from infermesh.router.metrics import CONTENT_TYPE, RouterMetrics
from infermesh.router.outcomes import OutcomeReporter
from infermesh.router.tracing import Tracer, outgoing
from infermesh.router.websocket import WebSocketChat

__all__ = ["RouterApp", "RouterSettings"]

_FORWARDED = {route.value: route for route in Route}
_LOCAL = {"/v1/models": "models", "/health": "health", "/metrics": "metrics"}


@attrs.frozen
class RouterSettings:
    """What the app needs from `config.router`."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_attempts: int = 2
    retry_after_s: float = 1.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    max_connections: int = 1024
    admission: AdmissionConfig = attrs.field(factory=AdmissionConfig)
    """`[router.admission]`: SLO-class concurrency, queues and shedding (docs/admission.md)."""
    kserve: KServeSettings = attrs.field(factory=KServeSettings)
    """The KServe v2 ingress: `/v2` routes, and the gRPC server when `grpc_listen` is set."""
    gate: Gate = attrs.field(factory=Gate)
    """API keys and CORS (`[router.http]`); the default lets everything through."""
    otel: bool = False
    body_timeout_s: float = 30.0
    """A request body not complete this long after its head gets 408."""


class RouterApp:
    """The ASGI callable served by `infermesh router run`."""

    def __init__(
        self,
        scoring: RouteScoring,
        transport_factories: Mapping[str, TransportFactory],
        settings: RouterSettings | None = None,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.settings = settings if settings is not None else RouterSettings()
        self.scoring = scoring
        self.agent = scoring.agent
        self.metrics = metrics if metrics is not None else RouterMetrics()
        scoring.attach_metrics(self.metrics)
        self.kserve = KServeIngress(
            scoring,
            lambda name: self.forwarder.transport(name),
            lambda outcome: self._report(outcome),
            self.metrics,
            self.settings.kserve,
            admit=lambda features: self.admission.admit(features),  # KServe infer is admitted too
        )
        self.reporter = OutcomeReporter(
            self.agent.report,
            linger_s=scoring.outcome_linger_s,
            on_dropped=self.metrics.outcomes_dropped.inc,
        )
        self.admission = AdmissionGate.for_scoring(
            self.settings.admission,
            self.metrics,
            scoring,
            retry_after_s=self.settings.retry_after_s,
        )
        self.forwarder = Forwarder(
            scoring,
            transport_factories,
            TransportContext(
                connect_timeout_s=self.settings.connect_timeout_s,
                read_timeout_s=self.settings.read_timeout_s,
                max_connections=self.settings.max_connections,
            ),
            ForwardSettings(
                max_attempts=self.settings.max_attempts,
                retry_after_s=self.settings.retry_after_s,
            ),
            self.metrics,
            self._report,
            saturated=self.admission.saturated,  # no hedges while admission sheds load
            policy=self.admission.policy,  # hedging rules in both scoring modes
        )
        self.gate = self.settings.gate
        self.tracer = Tracer(self.settings.otel)
        self.websocket = WebSocketChat(self)

    def _report(self, outcome: scoring_pb2.Outcome) -> None:
        """Outcomes go to the agent; their token counts also settle the tenant's quota."""
        self.admission.outcome(outcome)
        self.reporter.report(outcome)

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        await self.agent.start()
        await self.scoring.start()
        self.admission.start()
        self.reporter.start()
        await self.kserve.start()

    async def shutdown(self) -> None:
        await self.kserve.aclose()
        await self.admission.aclose()
        await self.scoring.aclose()
        await self.reporter.aclose()
        await self.forwarder.aclose()
        await self.agent.aclose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # ------------------------------------------------------------------ dispatch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.gate.active:
                checked = await self._gate(scope, send)
                if checked is None:
                    return
                send = checked
            path = scope["path"]
            route = _FORWARDED.get(path)
            if route is not None:
                await self._inference(route, scope, receive, send)
            elif is_kserve_path(path):
                await self.kserve(scope, receive, send)
            else:
                await self._local(_LOCAL.get(path), scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await self.websocket(scope, receive, send)

    async def _gate(self, scope: Scope, send: Send) -> Send | None:
        """Answer CORS preflights and refuse missing/wrong API keys; None when answered.

        Otherwise the `send` to use: one that adds CORS headers for an allowed origin.
        """
        view = view_of(scope["headers"])
        if self.gate.is_preflight(scope["method"], view):
            status, headers = self.gate.cors.preflight(view.origin, view.preflight_headers)
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return None
        cors_headers = self.gate.cors.response_headers(view.origin)
        try:
            self.gate.authorize(scope["path"], view)
        except ApiError as error:
            await send_error(send, error, [(b"www-authenticate", b"Bearer"), *cors_headers])
            self.metrics.count_request("other", 401)
            return None
        if not cors_headers:
            return send

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *cors_headers]
            await send(message)

        return send_with_cors

    async def _local(self, name: str | None, scope: Scope, send: Send) -> None:
        label = name or "other"
        status = 500
        gauge = self.metrics.in_progress_by_route[label]
        gauge.inc()
        try:
            if name is None:
                raise ApiError(
                    404,
                    f"no route for {scope['method']} {scope['path']}; the router serves "
                    "POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, "
                    "GET /v1/models, GET /health, GET /metrics and WebSocket "
                    "/v1/ws/chat/completions",
                    code="not_found",
                )
            if scope["method"] != "GET":
                raise _method_not_allowed(scope, "GET")
            if name == "models":
                status = await self._models(send)
            elif name == "health":
                status = await self._health(send)
            else:
                status = 200
                await send_bytes(send, 200, self.metrics.render(), CONTENT_TYPE.encode())
        except ApiError as error:
            status = error.status
            await send_error(send, error)
        finally:
            gauge.dec()
            self.metrics.count_request(label, status)

    async def _models(self, send: Send) -> int:
        try:
            names = await self.scoring.model_names()
        except AgentUnavailable as exc:
            raise ApiError(
                503,
                str(exc),
                error_type=SERVER_ERROR,
                code="agent_unavailable",
                retry_after_s=self.settings.retry_after_s,
            ) from None
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "infermesh"} for name in names
        ]
        await send_bytes(send, 200, orjson.dumps({"object": "list", "data": data}))
        return 200

    async def _health(self, send: Send) -> int:
        serving, reason = await self.scoring.health()
        if serving:
            body = {"status": "ok", "agent": self.agent.target, "scoring": self.scoring.mode}
            await send_bytes(send, 200, orjson.dumps(body))
            return 200
        body = {
            "status": "unavailable",
            "agent": self.agent.target,
            "scoring": self.scoring.mode,
            "reason": reason,
        }
        await send_bytes(send, 503, orjson.dumps(body))
        return 503

    # ------------------------------------------------------------------ inference

    async def _read_body(self, receive: Receive, content_length: int | None) -> bytes:
        """The body within `max_body_bytes` (413) and `body_timeout_s` (408)."""
        seconds = self.settings.body_timeout_s
        try:
            async with asyncio.timeout(seconds):
                return await read_body(receive, content_length, self.settings.max_body_bytes)
        except TimeoutError:
            raise _body_timeout(seconds) from None

    async def _inference(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        arrived = time.perf_counter()
        label = route.label
        gauge = self.metrics.in_progress_by_route[label]
        gauge.inc()
        status = 500
        request_id = ""
        span = None
        disconnected: asyncio.Future[Message] | None = None
        try:
            try:
                if scope["method"] != "POST":
                    raise _method_not_allowed(scope, "POST")
                headers = split_request_headers(scope["headers"], self.gate.auth)
                check_content_type(headers.content_type)
                request_id = headers.request_id or os.urandom(12).hex()
                if not headers.request_id:
                    headers.forward.append(("x-request-id", request_id))
                trace = outgoing(headers.traceparent)
                if self.tracer.enabled:
                    span = self.tracer.start(label, headers.traceparent, {"route": route.value})
                    trace = self.tracer.context_of(span, trace)
                headers.forward.append(("traceparent", trace.header()))
                body = await self._read_body(receive, headers.content_length)
                parsed = parse_request(route, body, headers.slo, headers.tenant, request_id)
                # Watch for the client leaving, so that its upstream request is cancelled too
                # (before the first byte for every request; mid-response for streams).
                disconnected = asyncio.ensure_future(receive())
                query: bytes = scope.get("query_string", b"")
                exchange = Exchange(
                    route=route,
                    parsed=parsed,
                    body=body,
                    headers=headers.forward,
                    send=send,
                    request_id_header=(b"x-request-id", request_id.encode("latin-1")),
                    arrived=arrived,
                    upstream_path=route.value + ("?" + query.decode("latin-1") if query else ""),
                    disconnected=disconnected,
                )
                # Admission after parsing (it needs the model, class and tenant), before any
                # target is chosen; leaving the block frees the slot however the request ends.
                async with self.admission.admit(parsed.features):
                    status = await self.forwarder.forward(exchange)
            except ApiError as error:
                status = error.status
                extra = [(b"x-request-id", request_id.encode("latin-1"))] if request_id else []
                await send_error(send, error, extra)
        except ClientDisconnected:
            status = 499
        finally:
            if disconnected is not None:
                _discard(disconnected)
            self.tracer.end(span, status)
            gauge.dec()
            self.metrics.count_request(label, status)


def _body_timeout(seconds: float) -> ApiError:
    return ApiError(
        408,
        f"request body was not received within {seconds:g} s (router.http.body_timeout_s)",
        code="request_timeout",
    )


def _discard(task: asyncio.Future[Message]) -> None:
    """Stop watching for a disconnect without awaiting (and without an unretrieved error)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _method_not_allowed(scope: Scope, allowed: str) -> ApiError:
    return ApiError(
        405,
        f"method {scope['method']} is not allowed on {scope['path']}; use {allowed}",
        code="method_not_allowed",
        allow=allowed,
    )

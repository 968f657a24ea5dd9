"""KServe v2 gRPC ingress: `inference.GRPCInferenceService` on `router.grpc_listen`.

ServerLive, ServerReady and ServerMetadata are the router's own answers; ModelReady,
ModelMetadata and ModelInfer go to the gRPC endpoint of the best Triton target serving the
model, their bytes passed through untouched, with the caller's deadline and metadata; a caller
that cancels cancels the upstream call. UNAVAILABLE, INTERNAL, UNKNOWN and RESOURCE_EXHAUSTED
from a target move the call to the next one; other codes reach the caller as Triton sent them.
gRPC health and reflection are served beside it. Never decodes a tensor.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infermesh.core.config import RuntimeConfig
from infermesh.core.proto import kserve_pb2
from infermesh.router.decision import Choice
from infermesh.router.kserve_metrics import KServeMetrics
from infermesh.router.kserve_routing import (
    AttemptFailed,
    KServeAttempt,
    KServeError,
    KServeRouting,
    Refusal,
    features_for,
)
from infermesh.router.kserve_wire import MalformedMessage, model_of

__all__ = ["GRPC_LABEL", "SERVICE", "KServeGrpcIngress", "UpstreamChannels", "grpc_targets_of"]

SERVICE = "inference.GRPCInferenceService"
GRPC_LABEL = "kserve_grpc"
"""The target label in which the Triton adapter publishes its server's gRPC `host:port`."""
_FORWARDED = ("ModelReady", "ModelMetadata", "ModelInfer")
_CALL_LABELS = {
    "ServerLive": "live",
    "ServerReady": "ready",
    "ServerMetadata": "server_metadata",
    "ModelReady": "model_ready",
    "ModelMetadata": "model_metadata",
    "ModelInfer": "infer",
}
_CODES = {
    Refusal.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Refusal.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Refusal.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Refusal.UPSTREAM_FAILED: grpc.StatusCode.UNAVAILABLE,
    Refusal.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
# The target failed (not the call): try the next one, as for an HTTP 5xx or 429.
_NEXT_TARGET = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# The HTTP status an outcome report carries for a gRPC code (what the agent's EWMAs read).
_HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.UNAVAILABLE: 503,
}
# Metadata a gRPC stack sets per hop; everything else the caller sent goes to Triton.
_HOP_METADATA = frozenset({"user-agent", "content-type", "te", "host", "accept-encoding"})


def grpc_targets_of(runtimes: Iterable[RuntimeConfig]) -> dict[str, str]:
    """Runtime base URL -> gRPC `host:port` of the same Triton, from `[[runtimes]]` tables that
    set `grpc_url` (a key of the table or of its `options`)."""
    targets: dict[str, str] = {}
    for runtime in runtimes:
        address = str(getattr(runtime, "grpc_url", "") or runtime.options.get("grpc_url", ""))
        if not address:
            continue
        for scheme in ("grpc://", "http://", "dns:///"):
            address = address.removeprefix(scheme)
        targets[runtime.url.rstrip("/")] = address
        targets[runtime.url] = address
    return targets


class UpstreamChannels:
    """One insecure grpc.aio channel per Triton gRPC address, made on first use."""

    def __init__(self, options: Sequence[tuple[str, Any]] = ()) -> None:
        self._options = list(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    def call(self, address: str, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        """The raw-bytes callable of `method` on `address`."""
        key = (address, method)
        callable_ = self._calls.get(key)
        if callable_ is None:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = grpc.aio.insecure_channel(
                    address, options=self._options
                )
            callable_ = self._calls[key] = channel.unary_unary(f"/{SERVICE}/{method}")
        return callable_

    async def aclose(self) -> None:
        channels, self._channels = self._channels, {}
        self._calls.clear()
        for channel in channels.values():
            await channel.close()


class KServeGrpcIngress:
    """The grpc.aio server of the KServe v2 gRPC ingress (see the module docstring).

    `grpc_targets` maps a runtime base URL (a target's endpoint) to its Triton gRPC address
    (from the router's `[[runtimes]]`); `label_of(target_id)` gives the `kserve_grpc` label the
    Triton adapter publishes on a target ("" when unknown), used for targets not in the map.
    """

    def __init__(
        self,
        listen: str,
        routing: KServeRouting,
        grpc_targets: Mapping[str, str],
        metrics: KServeMetrics,
        *,
        server_version: str,
        label_of: Callable[[str], str] = lambda target_id: "",
    ) -> None:
        self.listen = listen
        self.label_of = label_of
        self.routing = routing
        self.grpc_targets = dict(grpc_targets)
        self.metrics = metrics
        self.server_version = server_version
        self.port: int | None = None
        """The bound TCP port, once started."""
        self.channels = UpstreamChannels()
        self.health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind and serve; raises `OSError` naming `router.grpc_listen` when it cannot bind."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handlers: dict[str, grpc.RpcMethodHandler] = {
            "ServerLive": _unary(partial(self._own, "ServerLive", self._server_live)),
            "ServerReady": _unary(partial(self._own, "ServerReady", self._server_ready)),
            "ServerMetadata": _unary(partial(self._own, "ServerMetadata", self._server_metadata)),
        }
        for method in _FORWARDED:
            handlers[method] = _unary(partial(self._forward, method))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self.port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            await server.stop(None)
            raise OSError(f"router.grpc_listen {self.listen!r}: cannot bind ({exc})") from None
        await server.start()
        for service in ("", SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._server = server

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, let running calls finish for up to `grace_s`, close channels."""
        server, self._server = self._server, None
        if server is not None:
            await self.health.enter_graceful_shutdown()
            await server.stop(grace_s)
        await self.channels.aclose()

    # ------------------------------------------------------------------ the router's answers

    async def _own(
        self,
        method: str,
        answer: Callable[[], Awaitable[bytes]],
        request: bytes,
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> bytes:
        self.metrics.count("grpc", _CALL_LABELS[method], "OK")
        return await answer()

    async def _server_live(self) -> bytes:
        return kserve_pb2.ServerLiveResponse(live=True).SerializeToString()

    async def _server_ready(self) -> bytes:
        ready, _ = await self.routing.ready()
        return kserve_pb2.ServerReadyResponse(ready=ready).SerializeToString()

    async def _server_metadata(self) -> bytes:
        response = kserve_pb2.ServerMetadataResponse(
            name="infermesh-router", version=self.server_version
        )
        return response.SerializeToString()

    # ------------------------------------------------------------------ forwarded calls

    async def _forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        label = _CALL_LABELS[method]
        result = grpc.StatusCode.OK
        try:
            forwarded = _forwarded_metadata(context.invocation_metadata() or ())
            text = {key: value for key, value in forwarded if isinstance(value, str)}
            request_id = text.get("x-request-id") or os.urandom(12).hex()
            if "x-request-id" not in text:
                forwarded.append(("x-request-id", request_id))
            context.set_trailing_metadata((("x-request-id", request_id),))
            try:
                model, _ = model_of(request)
            except MalformedMessage as exc:
                details = f"malformed {method}Request: {exc}"
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, details) from None
            if not model:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the request names no model")
            slo, tenant = text.get("x-infermesh-slo"), text.get("x-infermesh-tenant")
            try:
                features = features_for(model, request_id, slo, tenant)
                attempt_on = partial(self._attempt, method, request, context, forwarded)
                return await self.routing.run(features, attempt_on, admitted=method == "ModelInfer")
            except KServeError as exc:
                if exc.retry_after_s is not None:
                    # When to come back, as HTTP's Retry-After (whole seconds) and as gRFC A6's
                    # server pushback (milliseconds), next to the request id.
                    context.set_trailing_metadata(
                        (
                            ("x-request-id", request_id),
                            ("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),
                            ("grpc-retry-pushback-ms", str(round(exc.retry_after_s * 1000))),
                        )
                    )
                raise _Abort(_CODES[exc.kind], exc.message) from None
        except _Abort as abort:
            result = abort.code
            await context.abort(abort.code, abort.details)
            raise AssertionError("context.abort returned") from None
        except asyncio.CancelledError:
            result = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.metrics.count("grpc", label, result.name)

    async def _attempt(
        self,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext[bytes, bytes],
        metadata: list[tuple[str, str | bytes]],
        attempt: KServeAttempt,
    ) -> bytes:
        """One Triton target: its answer, `AttemptFailed` to try the next, `_Abort` to relay."""
        address = self._address(attempt.target)
        timeout_s = context.time_remaining()
        started = time.perf_counter()
        try:
            response: bytes = await self.channels.call(address, method)(
                request, timeout=timeout_s, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            attempt.status = _HTTP_STATUS.get(code, 500)
            details = exc.details() or code.name
            attempt.error = f"{code.name}: {details}"
            if code in _NEXT_TARGET:
                raise AttemptFailed(f"Triton at {address}: {code.name}: {details}") from None
            # The call's fault (bad input, unknown model version, deadline): not the target's.
            attempt.ok = code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN)
            raise _Abort(code, details) from None
        except asyncio.CancelledError:
            # The caller went away; grpc.aio has cancelled the upstream call with this task.
            attempt.ok, attempt.status, attempt.error = True, 499, "client cancelled"
            raise
        finally:
            self.metrics.upstream_latency.labels("grpc", _CALL_LABELS[method]).observe(
                time.perf_counter() - started
            )
        attempt.ok, attempt.status = True, 200
        return response

    def _address(self, target: Choice) -> str:
        address = (
            self.grpc_targets.get(target.endpoint)
            or self.grpc_targets.get(target.endpoint.rstrip("/"))
            or target.grpc_target
            or self.label_of(target.target_id)
        )
        if not address:
            raise AttemptFailed(
                f"no gRPC endpoint is known for the Triton server at {target.endpoint}; set "
                "options.grpc_url in its [[runtimes]] table"
            )
        return address


class _Abort(Exception):
    """End the call with this status (raised where the code is known, aborted in one place)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _forwarded_metadata(
    pairs: Iterable[tuple[str, str | bytes]],
) -> list[tuple[str, str | bytes]]:
    """The caller's metadata less what each gRPC hop sets for itself (`grpc-*`, pseudo-headers,
    user-agent, content-type, ...); repeated keys stay repeated."""
    return [
        (key, value)
        for key, value in pairs
        if not key.startswith(("grpc-", ":")) and key not in _HOP_METADATA
    ]


def _unary(
    behavior: Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]],
) -> grpc.RpcMethodHandler:
    """A unary handler on raw bytes: no (de)serialisation in the router."""
    return grpc.unary_unary_rpc_method_handler(behavior)

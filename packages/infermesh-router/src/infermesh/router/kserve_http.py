"""KServe v2 HTTP ingress: `/v2/...` answered by the router or forwarded to a Triton target.

`/v2`, `/v2/health/live` and `/v2/health/ready` are the router's own (ready: the agent's state is
usable and some model is loaded). `/v2/models/{m}[/versions/{v}]` (metadata), `.../ready` and
`.../infer` go to the best Triton target serving `m`; JSON and binary-tensor bodies and headers
pass through untouched, the response streams back as it arrives. Errors the router makes are
KServe's `{"error": "..."}`. Never parses a tensor.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

import attrs
import orjson

from infermesh.core.contracts import Transport, UpstreamError
from infermesh.router.asgi import (
    HOP_BY_HOP,
    ClientDisconnected,
    Receive,
    Scope,
    Send,
    read_body,
    send_bytes,
    split_request_headers,
)
from infermesh.router.errors import ApiError
from infermesh.router.forward import error_excerpt, raw_headers_of
from infermesh.router.kserve_metrics import KServeMetrics
from infermesh.router.kserve_routing import (
    AttemptFailed,
    KServeAttempt,
    KServeError,
    KServeRouting,
    Refusal,
    features_for,
)

__all__ = ["KServeCall", "KServeHttp", "parse_kserve_path"]

_STATUS = {
    Refusal.BAD_REQUEST: 400,
    Refusal.NOT_FOUND: 404,
    Refusal.UNAVAILABLE: 503,
    Refusal.UPSTREAM_FAILED: 502,
    Refusal.OVERLOADED: 429,
}
_DROPPED_RESPONSE_HEADERS = frozenset(
    name.encode() for name in (HOP_BY_HOP - {"content-length"}) | {"x-request-id"}
)
_ROUTES_HELP = (
    "the router serves GET /v2, GET /v2/health/live|ready, GET /v2/models/{model}[/versions/"
    "{version}][/ready] and POST /v2/models/{model}[/versions/{version}]/infer"
)


@attrs.frozen
class KServeCall:
    """What a `/v2` path asks for: `call` names it, `method` is the one it must use."""

    call: str
    """`server_metadata`, `live`, `ready`, `model_metadata`, `model_ready` or `infer`."""
    method: str
    model: str = ""
    version: str = ""

    @property
    def forwarded(self) -> bool:
        return bool(self.model)


_SERVER_CALLS = {
    "/v2": KServeCall("server_metadata", "GET"),
    "/v2/health/live": KServeCall("live", "GET"),
    "/v2/health/ready": KServeCall("ready", "GET"),
}
_MODEL_CALLS = {"": ("model_metadata", "GET"), "ready": ("model_ready", "GET")}
_MODEL_CALLS["infer"] = ("infer", "POST")


def parse_kserve_path(path: str) -> KServeCall | None:
    """The call a `/v2...` path names, or None when the KServe v2 API has no such path."""
    path = path.rstrip("/") or "/"
    server_call = _SERVER_CALLS.get(path)
    if server_call is not None:
        return server_call
    parts = path.split("/")
    # "", "v2", "models", model, ["versions", version], [action]
    if len(parts) < 4 or parts[1] != "v2" or parts[2] != "models" or not parts[3]:
        return None
    model, rest = parts[3], parts[4:]
    version = ""
    if len(rest) >= 2 and rest[0] == "versions" and rest[1]:
        version, rest = rest[1], rest[2:]
    if len(rest) > 1:
        return None
    known = _MODEL_CALLS.get(rest[0] if rest else "")
    if known is None:
        return None
    call, method = known
    return KServeCall(call, method, model, version)


def error_response(message: str) -> bytes:
    """KServe v2's error body."""
    return orjson.dumps({"error": message})


class KServeHttp:
    """The ASGI handler of `/v2` paths (the app sends it every path starting with `/v2`).

    `transport` gives the transport plugin of a name (the forwarder's, so pools are shared);
    `server_version` is the router's version in `GET /v2`.
    """

    def __init__(
        self,
        routing: KServeRouting,
        transport: Callable[[str], Transport],
        metrics: KServeMetrics,
        *,
        max_body_bytes: int,
        server_version: str,
    ) -> None:
        self.routing = routing
        self.transport = transport
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.server_version = server_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        call = parse_kserve_path(path)
        label = call.call if call is not None else "other"
        status = 500
        request_id = ""
        try:
            if call is None:
                raise ApiError(404, f"no KServe v2 route {scope['method']} {path}; {_ROUTES_HELP}")
            if scope["method"] != call.method:
                raise ApiError(
                    405,
                    f"method {scope['method']} is not allowed on {path}; use {call.method}",
                    allow=call.method,
                )
            if not call.forwarded:
                status = await self._answer(call, send)
            else:
                headers = split_request_headers(scope["headers"])
                request_id = headers.request_id or os.urandom(12).hex()
                if not headers.request_id:
                    headers.forward.append(("x-request-id", request_id))
                body = b""
                if call.method == "POST":
                    body = await read_body(receive, headers.content_length, self.max_body_bytes)
                features = features_for(call.model, request_id, headers.slo, headers.tenant)
                raw_path: bytes = scope.get("raw_path") or path.encode()
                query: bytes = scope.get("query_string", b"")
                upstream_path = raw_path.decode("latin-1") + (
                    "?" + query.decode("latin-1") if query else ""
                )
                exchange = _Exchange(
                    call, upstream_path, headers.forward, body, send, request_id.encode("latin-1")
                )
                status = await self.routing.run(
                    features, partial(self._attempt, exchange), admitted=call.call == "infer"
                )
        except ApiError as error:
            status = error.status
            await self._send_error(send, status, error.message, error.headers(), request_id)
        except KServeError as error:
            status = _STATUS[error.kind]
            extra = []
            if error.retry_after_s is not None:
                extra = ApiError(status, "", retry_after_s=error.retry_after_s).headers()
            await self._send_error(send, status, error.message, extra, request_id)
        except ClientDisconnected:
            status = 499
        finally:
            self.metrics.count("http", label, str(status))

    async def _send_error(
        self,
        send: Send,
        status: int,
        message: str,
        extra: Sequence[tuple[bytes, bytes]],
        request_id: str,
    ) -> None:
        headers = list(extra)
        if request_id:
            headers.append((b"x-request-id", request_id.encode("latin-1")))
        await send_bytes(send, status, error_response(message), extra_headers=headers)

    async def _attempt(self, exchange: _Exchange, attempt: KServeAttempt) -> int:
        """Send the call to one Triton target and relay its answer; `AttemptFailed` (nothing
        relayed) when it cannot be reached or answers 5xx."""
        target = attempt.target
        transport = self.transport(target.transport)
        url = target.endpoint.rstrip("/") + exchange.upstream_path
        try:
            upstream = await transport.request(
                exchange.call.method, url, exchange.headers, exchange.body
            )
        except UpstreamError as exc:
            raise AttemptFailed(str(exc)) from None
        attempt.status = upstream.status
        chunks = upstream.chunks()
        try:
            if upstream.status >= 500:
                raise AttemptFailed(f"HTTP {upstream.status}: {await error_excerpt(chunks)}")
            return await _relay(exchange, attempt, raw_headers_of(upstream), chunks)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            upstream.release()
            self.metrics.upstream_latency.labels("http", exchange.call.call).observe(
                time.perf_counter() - attempt.started
            )

    async def _answer(self, call: KServeCall, send: Send) -> int:
        """The calls about the router itself."""
        if call.call == "live":
            await send_bytes(send, 200, b'{"live":true}')
            return 200
        if call.call == "ready":
            ready, reason = await self.routing.ready()
            if ready:
                await send_bytes(send, 200, b'{"ready":true}')
                return 200
            # KServe v2: a 4xx status says "not ready".
            body = orjson.dumps({"ready": False, "error": f"router not ready: {reason}"})
            await send_bytes(send, 400, body)
            return 400
        body = orjson.dumps(
            {"name": "infermesh-router", "version": self.server_version, "extensions": []}
        )
        await send_bytes(send, 200, body)
        return 200


@attrs.frozen
class _Exchange:
    """One forwarded KServe HTTP call."""

    call: KServeCall
    upstream_path: str
    headers: list[tuple[str, str]]
    body: bytes
    send: Send
    request_id: bytes


async def _relay(
    exchange: _Exchange,
    attempt: KServeAttempt,
    upstream_headers: Sequence[tuple[bytes, bytes]],
    chunks: AsyncIterator[bytes],
) -> int:
    """Triton's status and headers (hop-by-hop and its request id dropped, ours added), then
    the body as it arrives."""
    send = exchange.send
    headers = [
        (lower, value)
        for lower, value in ((name.lower(), value) for name, value in upstream_headers)
        if lower not in _DROPPED_RESPONSE_HEADERS
    ]
    headers.append((b"x-request-id", exchange.request_id))
    await send({"type": "http.response.start", "status": attempt.status, "headers": headers})
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except UpstreamError as exc:
        # Headers are out: end here, so the client sees a truncated response, not a wrong one.
        attempt.ok, attempt.error = False, f"failed mid-response: {exc}"
        return attempt.status
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    attempt.ok = True
    return attempt.status

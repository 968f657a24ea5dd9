"""WebSocket streaming of completions: `/v1/ws/chat/completions` and `/v1/ws/completions`.

What a client sees: after the handshake it sends one OpenAI request body (JSON text or binary
frame) per message; the router routes it like the HTTP endpoint, always streaming, and sends back
- each stream chunk as one text message, exactly the chunk object the HTTP stream would carry
  (`{"object": "chat.completion.chunk", ...}`);
- then `{"type": "done", "request_id": ...}` when the response is complete;
- or, instead of `done`, `{"type": "error", "status": N, "request_id": ..., "error": {...}}` with
  the OpenAI error object, for a bad request, a refusal by admission (429), no target, or a
  runtime failing mid-stream.
Requests on one connection are answered in order, one at a time; the connection stays open
after an error. Closing the WebSocket cancels the request in flight upstream (the runtime sees
the connection close and frees its slot). API keys and CORS origins are checked at the
handshake like HTTP requests (a refused handshake gets HTTP 403).

The bridge is the `_FrameSender` adapter: the `Forwarder` writes ASGI `http.response.*`
messages to it, and it turns the SSE body into WebSocket frames.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from infermesh.core.logging import get_logger
from infermesh.router.asgi import Message, Receive, Scope, Send, split_request_headers
from infermesh.router.errors import SERVER_ERROR, ApiError, bad_request, error_json
from infermesh.router.features import Route, parse_body, parse_request
from infermesh.router.forward import Exchange
from infermesh.router.hygiene import view_of
from infermesh.router.tracing import outgoing

if TYPE_CHECKING:
    from infermesh.router.app import RouterApp

__all__ = ["WS_ROUTES", "WebSocketChat"]

log = get_logger(__name__)

WS_ROUTES = {"/v1/ws/chat/completions": Route.CHAT, "/v1/ws/completions": Route.COMPLETIONS}
_DATA = b"data:"
_DONE = b"[DONE]"
POLICY_VIOLATION = 1008


class _FrameSender:
    """An ASGI `send` for the Forwarder that writes WebSocket messages instead of HTTP."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.status = 0
        self.sse = False
        self.finished = False
        """A terminal message (done or error) was sent."""
        self.closed = False
        """The client went away; nothing more is sent."""
        self._pending = b""
        self._body: list[bytes] = []

    async def text(self, payload: Any) -> None:
        if self.closed:
            return
        try:
            await self._send({"type": "websocket.send", "text": orjson.dumps(payload).decode()})
        except Exception:  # the server raises its own "disconnected" error types
            self.closed = True

    async def done(self) -> None:
        if not self.finished:
            self.finished = True
            await self.text({"type": "done", "request_id": self.request_id})

    async def error(self, status: int, error: Any) -> None:
        if not self.finished:
            self.finished = True
            await self.text(
                {"type": "error", "status": status, "request_id": self.request_id, **error}
            )

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for name, value in message.get("headers", ()):
                if name.lower() == b"content-type":
                    self.sse = value.startswith(b"text/event-stream")
            return
        body: bytes = message.get("body", b"")
        more = message.get("more_body", False)
        if self.sse and self.status < 400:
            await self._events(body)
        else:
            self._body.append(body)
            if not more:
                await self._whole(b"".join(self._body))

    async def _events(self, body: bytes) -> None:
        data = self._pending + body
        *events, self._pending = data.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if not line.startswith(_DATA):
                    continue
                payload = line[len(_DATA) :].strip()
                if payload == _DONE:
                    await self.done()
                    continue
                try:
                    chunk = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(chunk, dict) and "error" in chunk:
                    await self.error(502, {"error": chunk["error"]})
                else:
                    await self.text(chunk)

    async def _whole(self, body: bytes) -> None:
        """A non-streamed answer: an error object, or one complete response then done."""
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if self.status >= 400:
            error = parsed if isinstance(parsed, dict) and "error" in parsed else None
            if error is None:
                text = body[:512].decode("utf-8", "replace")
                error = error_json(
                    f"upstream answered {self.status}: {text}", SERVER_ERROR, None, None
                )
            await self.error(self.status, error)
            return
        if parsed is not None:
            await self.text(parsed)
        await self.done()


class WebSocketChat:
    """The router's WebSocket endpoint, built on the app's Forwarder and gate."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        route = WS_ROUTES.get(scope["path"])
        refusal = self._refusal(scope)
        if route is None or refusal:
            if refusal:
                log.info("websocket refused", path=scope["path"], reason=refusal)
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
            return
        await send({"type": "websocket.accept"})
        gauge = self.app.metrics.in_progress_by_route["ws"]
        gauge.inc()
        try:
            await self._serve(route, scope, receive, send)
        finally:
            gauge.dec()

    def _refusal(self, scope: Scope) -> str:
        """Why the handshake is refused (wrong key, origin not allowed), or ''."""
        gate = self.app.gate
        if not gate.active:
            return ""
        view = view_of(scope["headers"])
        try:
            gate.authorize(scope["path"], view)
        except ApiError as error:
            return error.message
        if gate.cors.enabled and view.origin and not gate.cors.allows(view.origin):
            return f"origin {view.origin!r} is not in router.http.cors_origins"
        return ""

    async def _serve(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        requests: asyncio.Queue[bytes | None] = asyncio.Queue()
        closed: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        reader = asyncio.create_task(self._read(receive, requests, closed))
        try:
            while True:
                body = await requests.get()
                if body is None:
                    return
                await self._one(route, scope, body, send, closed)
                if closed.done():
                    return
        finally:
            reader.cancel()

    @staticmethod
    async def _read(
        receive: Receive, requests: asyncio.Queue[bytes | None], closed: asyncio.Future[Message]
    ) -> None:
        """Queue each request message; on close, resolve `closed` and end the queue."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                if not closed.done():
                    closed.set_result(message)
                requests.put_nowait(None)
                return
            if message["type"] == "websocket.receive":
                data = message.get("bytes")
                if data is None:
                    data = (message.get("text") or "").encode("utf-8", "surrogatepass")
                requests.put_nowait(data)

    async def _one(
        self,
        route: Route,
        scope: Scope,
        body: bytes,
        send: Send,
        closed: asyncio.Future[Message],
    ) -> None:
        app = self.app
        arrived = time.perf_counter()
        headers = split_request_headers(scope["headers"], app.gate.auth)
        request_id = os.urandom(12).hex()
        frames = _FrameSender(send, request_id)
        status = 500
        try:
            if len(body) > app.settings.max_body_bytes:
                raise ApiError(
                    413,
                    f"message is larger than the router's limit of {app.settings.max_body_bytes} "
                    "bytes (router.max_body_bytes)",
                    code="request_too_large",
                )
            body = _streaming(body)
            parsed = parse_request(route, body, headers.slo, headers.tenant, request_id)
            forward = [(k, v) for k, v in headers.forward if k != "x-request-id"]
            forward.append(("x-request-id", request_id))
            forward.append(("traceparent", outgoing(headers.traceparent).header()))
            exchange = Exchange(
                route=route,
                parsed=parsed,
                body=body,
                headers=forward,
                send=frames,
                request_id_header=(b"x-request-id", request_id.encode()),
                arrived=arrived,
                upstream_path=route.value,
                disconnected=closed,
            )
            task = asyncio.ensure_future(self._admitted(exchange))
            watch: list[asyncio.Future[Any]] = [task, closed]
            try:
                await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()  # the server is closing this connection: end the request too
                raise
            if not task.done():
                # The client closed the WebSocket: stop the request upstream now rather than at
                # the runtime's next chunk.
                task.cancel()
                frames.closed = True
                status = 499
            try:
                status = await task
            except asyncio.CancelledError:
                if not closed.done():
                    raise
                return
            if not frames.finished and status < 400:
                await frames.done()
        except ApiError as error:
            status = error.status
            await frames.error(error.status, orjson.loads(error.body()))
        finally:
            app.metrics.count_request("ws", status)

    async def _admitted(self, exchange: Exchange) -> int:
        """Admission as for HTTP requests (a refusal is an error message with status 429), then
        the Forwarder."""
        async with self.app.admission.admit(exchange.parsed.features):
            return await self.app.forwarder.forward(exchange)


def _streaming(body: bytes) -> bytes:
    """The request with `"stream": true` (WebSocket answers are always streamed)."""
    data = parse_body(body)
    if data.get("stream") is True:
        return body
    if data.get("stream") not in (None, False):
        raise bad_request(f"'stream' must be a boolean, not {data['stream']!r}", param="stream")
    data["stream"] = True
    return orjson.dumps(data)

"""One HTTP/1.1 client connection to a runtime: an asyncio protocol parsing with httptools.

Writes one request at a time and turns the response into a status, raw headers and body chunks
handed over as they arrive (never re-buffered beyond what the socket delivered; reading pauses
when the consumer falls more than `HIGH_WATER_BYTES` behind). Knows nothing of pools or URLs;
every failure is recorded as text for the caller to raise. Never retries.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable
from typing import cast

import httptools

__all__ = ["UpstreamConnection"]

HIGH_WATER_BYTES = 1 << 20
LOW_WATER_BYTES = 1 << 18
COPY_BODY_BYTES = 1 << 16
"""Bodies up to this size are copied after the head and sent in one write."""


class UpstreamConnection(asyncio.Protocol):
    """A keep-alive connection: `send()` a request, then read its response.

    `error` is set (and the connection unusable) when the runtime closes the connection before
    the response is complete, sends something unparsable, or stops sending for
    `read_timeout_s`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        read_timeout_s: float,
        on_closed: Callable[[UpstreamConnection], None] | None = None,
    ) -> None:
        self.loop = loop
        self._on_closed = on_closed
        self.read_timeout_s = read_timeout_s
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error = ""
        self.idle_since = 0.0
        """Loop time at which the connection went back to its pool."""
        self.origin: Hashable = None
        """The pool's key for where this connection goes."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: deque[bytes] = deque()
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self._buffered = 0
        self._paused = False
        self._interim = False
        self._framed = False
        """The response declares its length (Content-Length or chunked): EOF is not its end."""
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed HTTP response ({exc})")
            self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        busy = self._timer is not None or self.head_done  # a request was in progress
        self.closed = True
        self._cancel_timer()
        if self.head_done and not self.complete and not self._framed and not self.error:
            # A response without Content-Length or chunking ends when the connection does.
            self.complete = True
            self.keep_alive = False
        elif busy and not self.complete and not self.error:
            reason = f" ({exc})" if exc else ""
            where = "before the response" if not self.head_done else "mid-response"
            self.error = f"connection closed {where}{reason}"
        self._wake()
        if self._on_closed is not None:
            self._on_closed(self)

    # ------------------------------------------------------------------ httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length" or (
            lower == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response (100 Continue, 103 Early Hints)
            self._interim = True
            self.headers = []
            self._framed = False
            return
        self.status = status
        if status in (204, 304):
            self._framed = True
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._cancel_timer()
        self._wake()

    # ------------------------------------------------------------------ the caller's side

    def send(self, data: bytes, body: bytes) -> None:
        """Start a request: `data` (the head, maybe with the body) then `body` if not in it."""
        assert self.transport is not None
        self.status = 0
        self.headers = []
        self.head_done = self.complete = self.keep_alive = False
        self._framed = False
        self._last_read = self.loop.time()
        self._timer = self.loop.call_later(self.read_timeout_s, self._check_idle)
        if len(body) <= COPY_BODY_BYTES:
            self.transport.write(data + body)  # one send for the usual small request
        else:
            self.transport.writelines((data, body))

    async def wait(self) -> None:
        """Until the parser or the connection has news (or an error is set)."""
        if self.error or self.closed:
            return
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Every body byte received and not yet taken (b"" when none is waiting).

        Pieces that arrived together (several SSE events in one read) are handed over as one,
        so relaying them costs one write instead of one per piece; nothing is held back.
        """
        chunks = self.chunks
        if not chunks:
            return b""
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:
            chunk = b"".join(chunks)
            chunks.clear()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < LOW_WATER_BYTES and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and not self.error

    def close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    # ------------------------------------------------------------------ internals

    def _check_idle(self) -> None:
        idle_s = self.loop.time() - self._last_read
        if idle_s < self.read_timeout_s:
            self._timer = self.loop.call_later(self.read_timeout_s - idle_s, self._check_idle)
            return
        self._timer = None
        self._fail(f"timed out: nothing read for {self.read_timeout_s:g} s")
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, message: str) -> None:
        if not self.error:
            self.error = message
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

"""Slowloris and oversized-head guards for the uvicorn (httptools) server.

uvicorn closes idle keep-alive connections but puts no deadline or size cap on reading a
request head. `guarded_protocol` returns its HTTP protocol with both added; what a client sees:
- a request head (request line and headers) not complete within `header_timeout_s` of the
  connection opening or of its first byte: `408` and the connection is closed;
- a request head larger than `max_header_bytes`: `431` and the connection is closed.
Everything else is uvicorn's own behaviour. Hypercorn has equivalents in its own config
(`keep_alive_timeout`, `h11_max_incomplete_size`, `h2_max_header_list_size`).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from infermesh.router.errors import error_body

__all__ = ["GuardedHttpToolsProtocol", "guarded_protocol"]


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = error_body(message, "invalid_request_error", None, code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head deadline and size cap."""

    header_timeout_s: float = 10.0
    max_header_bytes: int = 16384

    _head_pending: bool = False
    _head_bytes: int = 0
    _head_tail: bytes = b""
    _measuring: bool = False
    """The next bytes belong to a request head (from the connection's start, and from the end
    of each request message until the end of the next head)."""
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._measure_next_head()
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._measuring and not self.transport.is_closing():
            # Measure the head before parsing: up to the blank line that ends it, or all of
            # `data` while it has not ended yet (the blank line may straddle two reads).
            window = self._head_tail + data
            end = window.find(b"\r\n\r\n")
            size = self._head_bytes + (len(data) if end < 0 else end + 4 - len(self._head_tail))
            if size > self.max_header_bytes:
                self._refuse(
                    _response(
                        431,
                        "Request Header Fields Too Large",
                        f"request headers are larger than the router's limit of "
                        f"{self.max_header_bytes} bytes (router.http.max_header_bytes)",
                        "request_header_fields_too_large",
                    )
                )
                return
            self._head_bytes += len(data)
            self._head_tail = window[-3:]
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._head_pending:
            self._await_head()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._measure_next_head()

    def on_headers_complete(self) -> None:
        self._measuring = False
        self._head_pending = False
        self._stop_head_timer()
        super().on_headers_complete()

    def _measure_next_head(self) -> None:
        self._measuring = True
        self._head_bytes = 0
        self._head_tail = b""

    def _await_head(self) -> None:
        self._head_pending = True
        self._stop_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self._head_pending or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:
            # A connection opened and never used: close it without an answer.
            self.transport.close()
            return
        self._refuse(
            _response(
                408,
                "Request Timeout",
                f"request headers were not complete within {self.header_timeout_s:g} s "
                "(router.http.header_timeout_s)",
                "request_timeout",
            )
        )

    def _refuse(self, response: bytes) -> None:
        self._head_pending = self._measuring = False
        self._stop_head_timer()
        self.transport.write(response)
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_header_bytes: int) -> type[HttpToolsProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`."""
    return type(
        "RouterHttpProtocol",
        (GuardedHttpToolsProtocol,),
        {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes},
    )

"""W3C Trace Context for forwarded requests; OpenTelemetry spans when the optional extra is on.

What a user sees: every forwarded request carries a `traceparent` header upstream. When the
client sent a valid one, the trace id and flags are kept and the parent id becomes a new span id
(the router's hop); when it sent none or an invalid one, the router starts a new sampled trace.
`tracestate` is forwarded unchanged. With `router.http.otel = true` and `opentelemetry-api`
installed (`pip install 'infermesh-router[otel]'` plus an SDK configured by the process), each
forwarded request is also an OpenTelemetry server span whose id is the one sent upstream.

`parse`, `child` and `root` are pure (randomness injected); `Tracer` is the thin OTel shell.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import attrs

from infermesh.core.logging import get_logger

__all__ = ["TraceContext", "Tracer", "child", "parse", "root"]

log = get_logger(__name__)

HEADER = "traceparent"
_HEX = frozenset("0123456789abcdef")

RandomBytes = Callable[[int], bytes]


@attrs.frozen
class TraceContext:
    """One `traceparent` value: version 00, trace id, parent (span) id, flags."""

    trace_id: str
    span_id: str
    flags: str = "01"

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def _hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX and value != "0" * length


def parse(value: str) -> TraceContext | None:
    """The context in a `traceparent` header, or None when it is not a valid one.

    Accepts version 00 exactly and, as the spec asks, higher versions by their first four
    fields; rejects upper-case hex, all-zero ids and version ff.
    """
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[:4]
    if len(version) != 2 or not set(version) <= _HEX or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not (_hex(trace_id, 32) and _hex(span_id, 16) and len(flags) == 2 and set(flags) <= _HEX):
        return None
    return TraceContext(trace_id, span_id, flags)


def root(random_bytes: RandomBytes = os.urandom) -> TraceContext:
    """A new sampled trace."""
    return TraceContext(random_bytes(16).hex(), random_bytes(8).hex(), "01")


def child(parent: TraceContext, random_bytes: RandomBytes = os.urandom) -> TraceContext:
    """The router's hop in `parent`'s trace: same trace and flags, a new span id."""
    return TraceContext(parent.trace_id, random_bytes(8).hex(), parent.flags)


def outgoing(incoming: str | None, random_bytes: RandomBytes = os.urandom) -> TraceContext:
    """The context to send upstream given the client's `traceparent` (None when absent)."""
    parent = parse(incoming) if incoming else None
    return child(parent, random_bytes) if parent is not None else root(random_bytes)


class Tracer:
    """OpenTelemetry spans for forwarded requests, or nothing when disabled or not installed."""

    def __init__(self, enabled: bool) -> None:
        self._trace: Any = None
        if not enabled:
            return
        try:
            self._trace = importlib.import_module("opentelemetry.trace")
        except ImportError:
            log.warning(
                "router.http.otel is true but opentelemetry-api is not installed; "
                "install infermesh-router[otel] (traceparent is still propagated)"
            )

    @property
    def enabled(self) -> bool:
        return self._trace is not None

    def start(self, name: str, incoming: str | None, attributes: dict[str, str]) -> Any:
        """A started span for this request as a child of the client's context (None if off)."""
        trace = self._trace
        if trace is None:
            return None
        parent = parse(incoming) if incoming else None
        context = None
        if parent is not None:
            span_context = trace.SpanContext(
                trace_id=int(parent.trace_id, 16),
                span_id=int(parent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(int(parent.flags, 16)),
            )
            context = trace.set_span_in_context(trace.NonRecordingSpan(span_context))
        tracer = trace.get_tracer("infermesh.router")
        return tracer.start_span(
            name, context=context, kind=trace.SpanKind.SERVER, attributes=attributes
        )

    @staticmethod
    def context_of(span: Any, fallback: TraceContext) -> TraceContext:
        """The span's own context as `traceparent` (the fallback for a non-recording span)."""
        if span is None:
            return fallback
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return fallback
        return TraceContext(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", f"{ctx.trace_flags:02x}")

    @staticmethod
    def end(span: Any, status: int) -> None:
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        span.end()

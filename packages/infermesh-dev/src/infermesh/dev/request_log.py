"""The emulator's dev-only per-request log: where each request's time to first token went.

Sans-I/O: the emulator calls `arrived` when it hands a request to the engine and `finished`
with the engine's stats when it ends; `GET /dev/requests` serves `entries()`. One entry per
engine request, keyed by the client's `X-Request-Id` (and the response id the client saw), so a
benchmark can tell, for each request, whether its prompt was a prefix-cache hit and whether its
first token waited in the queue or in the prefill. Not a vLLM feature: vLLM reports the same
figures only in aggregate (its `vllm:request_queue_time_seconds` histograms).
"""

from __future__ import annotations

from collections import deque

import attrs

from infermesh.dev.engine import EngineSnapshot, FinishedStats

__all__ = ["REQUESTS_KEPT", "RequestLog"]

REQUESTS_KEPT = 20_000
"""Finished requests `GET /dev/requests` remembers (the most recent)."""


@attrs.frozen
class _Arrival:
    x_request_id: str
    arrived_unix_s: float
    waiting: int
    running: int


class RequestLog:
    """Finished requests with their queue wait, prefill time and prefix-cache hit."""

    def __init__(self, kept: int = REQUESTS_KEPT) -> None:
        if kept < 1:
            raise ValueError(f"kept must be >= 1, got {kept}")
        self._pending: dict[str, _Arrival] = {}
        self._done: deque[dict[str, object]] = deque(maxlen=kept)

    def arrived(
        self, request_id: str, x_request_id: str, snapshot: EngineSnapshot, now_unix_s: float
    ) -> None:
        """`request_id` (the response id) reached the engine; `snapshot` is the engine just
        before, so its queue is what the request found."""
        self._pending[request_id] = _Arrival(
            x_request_id=x_request_id,
            arrived_unix_s=now_unix_s,
            waiting=snapshot.waiting,
            running=snapshot.running,
        )

    def finished(self, stats: FinishedStats) -> None:
        """The engine finished (or aborted) a request; unknown ids are ignored."""
        arrival = self._pending.pop(stats.request_id, None)
        if arrival is None:
            return
        self._done.append(
            {
                "x_request_id": arrival.x_request_id,
                "response_id": stats.request_id,
                "arrived_unix_s": round(arrival.arrived_unix_s, 6),
                "waiting_at_arrival": arrival.waiting,
                "running_at_arrival": arrival.running,
                "prompt_tokens": stats.prompt_tokens,
                "cached_tokens": stats.cached_tokens,
                "queue_s": round(stats.queue_s, 6),
                "prefill_s": round(stats.prefill_s, 6),
                "ttft_s": round(stats.queue_s + stats.prefill_s, 6),
                "e2e_s": round(stats.e2e_s, 6),
                "output_tokens": stats.generation_tokens,
                "preemptions": stats.num_preemptions,
                "finish_reason": stats.finish_reason,
            }
        )

    def entries(self) -> list[dict[str, object]]:
        """The finished requests, oldest first."""
        return list(self._done)

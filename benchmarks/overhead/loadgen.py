"""Closed-loop load generator: N concurrent clients on one keep-alive aiohttp session.

Each client sends one request, reads the whole answer (for a stream: up to `data: [DONE]`),
records how long it took, and sends the next. It never retries and never sleeps: the offered
load is exactly the concurrency, so throughput and latency are measured at the same point.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

__all__ = ["LoadResult", "LoadSpec", "chat_body", "percentile", "run_load"]

_DONE = b"data: [DONE]"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One load phase: where to send, what, how hard and for how long."""

    urls: Sequence[str]
    """Full URLs (`.../v1/chat/completions`); requests go to them in turn (client round robin)."""
    body: bytes
    stream: bool
    concurrency: int
    warmup_s: float
    duration_s: float
    max_requests: int = 0
    """Stop measuring after this many requests (0: only the duration bounds the phase)."""
    request_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What one phase measured. Latencies are seconds, in completion order."""

    latencies_s: tuple[float, ...]
    ttfts_s: tuple[float, ...]
    """Time to the first body chunk (streams only; empty for non-streaming phases)."""
    window_s: float
    errors: int
    first_error: str
    completed_total: int
    """Requests completed in the whole phase, warm-up included (to share out CPU time)."""

    @property
    def requests(self) -> int:
        return len(self.latencies_s)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else 0.0

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies_s, q) * 1000.0

    def ttft_ms(self, q: float) -> float:
        return percentile(self.ttfts_s, q) * 1000.0 if self.ttfts_s else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks; NaN if empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} outside [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def chat_body(model: str, *, stream: bool, max_tokens: int, prompt: str = "Say hello.") -> bytes:
    """A small OpenAI chat-completions request body."""
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


class _Recorder:
    """Collects samples of requests that started inside the measurement window."""

    def __init__(self, spec: LoadSpec, start: float) -> None:
        self.measure_from = start + spec.warmup_s
        self.stop_at = self.measure_from + spec.duration_s
        self.max_requests = spec.max_requests
        self.latencies_s: list[float] = []
        self.ttfts_s: list[float] = []
        self.errors = 0
        self.first_error = ""
        self.last_done = self.measure_from
        self.completed_total = 0

    def should_stop(self, now: float) -> bool:
        if now >= self.stop_at:
            return True
        return 0 < self.max_requests <= len(self.latencies_s) + self.errors

    def record(self, started: float, ttft_s: float | None, done: float, error: str) -> None:
        self.completed_total += 1
        if started < self.measure_from:
            return
        self.last_done = max(self.last_done, done)
        if error:
            self.errors += 1
            self.first_error = self.first_error or error
            return
        self.latencies_s.append(done - started)
        if ttft_s is not None:
            self.ttfts_s.append(ttft_s)


async def _one_request(
    session: aiohttp.ClientSession, url: str, spec: LoadSpec, started: float
) -> tuple[float | None, str]:
    """Send one request and read all of it; return (ttft_s, error message or "")."""
    headers = {"content-type": "application/json"}
    async with session.post(url, data=spec.body, headers=headers) as response:
        if not spec.stream:
            payload = await response.read()
            if response.status != 200:
                return None, f"HTTP {response.status} from {url}: {payload[:200]!r}"
            return None, ""
        ttft_s: float | None = None
        tail = b""
        async for chunk in response.content.iter_any():
            if ttft_s is None:
                ttft_s = time.perf_counter() - started
            tail = (tail + chunk)[-64:]
        if response.status != 200:
            return ttft_s, f"HTTP {response.status} from {url}: {tail!r}"
        if _DONE not in tail:
            return ttft_s, f"stream from {url} ended without 'data: [DONE]': ...{tail!r}"
        return ttft_s, ""


async def _client(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    turn: itertools.count[int],
    recorder: _Recorder,
) -> None:
    urls = spec.urls
    while not recorder.should_stop(time.perf_counter()):
        url = urls[next(turn) % len(urls)]
        started = time.perf_counter()
        try:
            ttft_s, error = await _one_request(session, url, spec, started)
        except (aiohttp.ClientError, TimeoutError) as exc:
            ttft_s, error = None, f"{type(exc).__name__} from {url}: {exc}"
        recorder.record(started, ttft_s, time.perf_counter(), error)


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run one phase: warm up, then measure for `duration_s` (or `max_requests`)."""
    if spec.concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {spec.concurrency}")
    if not spec.urls:
        raise ValueError("no URLs to send load to")
    connector = aiohttp.TCPConnector(limit=spec.concurrency, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        recorder = _Recorder(spec, time.perf_counter())
        turn = itertools.count()
        async with asyncio.TaskGroup() as group:
            for _ in range(spec.concurrency):
                group.create_task(_client(session, spec, turn, recorder))
    return LoadResult(
        latencies_s=tuple(recorder.latencies_s),
        ttfts_s=tuple(recorder.ttfts_s),
        window_s=recorder.last_done - recorder.measure_from,
        errors=recorder.errors,
        first_error=recorder.first_error,
        completed_total=recorder.completed_total,
    )

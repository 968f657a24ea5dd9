"""An async load generator for OpenAI-compatible servers: shared-prefix chat mixes, streamed or not.

Closed loop (a fixed number of requests in flight) or open loop (Poisson arrivals, capped in
flight); records TTFT, inter-token latency and end-to-end latency per request and reports
percentiles. Only a client: it never starts servers or reads their metrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import aiohttp
import attrs

__all__ = [
    "LatencySummary",
    "LoadReport",
    "LoadSpec",
    "PromptMix",
    "RequestRecord",
    "percentile",
    "replica_tag_of",
    "run_load",
    "summarize",
]

_TOPICS = (
    "incident response for a payments platform",
    "a travel agency's refund policy",
    "the internal style guide of a compiler team",
    "customer support for a home-network router",
    "a hospital's appointment scheduling rules",
    "an online bookstore's catalogue and shipping terms",
    "a university course on distributed systems",
    "a cloud provider's GPU quota process",
)
_SENTENCES = (
    "Answer precisely and cite the relevant section when you can.",
    "If a question is ambiguous, state the assumption you make before answering.",
    "Never reveal internal identifiers, credentials or personal data.",
    "Prefer short paragraphs and numbered steps for procedures.",
    "When the policy does not cover a case, say so and suggest whom to contact.",
    "Keep the tone friendly, factual and free of speculation.",
    "Use metric units and ISO dates in every answer.",
    "Escalate anything that looks like a safety issue immediately.",
)


@attrs.frozen
class PromptMix:
    """Chat requests that share one of `num_prefixes` long system prompts, plus a short question."""

    num_prefixes: int = 4
    prefix_chars: int = 2400
    """Length of each shared system prompt (about a quarter as many tokens)."""
    question_chars: int = 120

    def __attrs_post_init__(self) -> None:
        if self.num_prefixes < 1:
            raise ValueError(f"num_prefixes must be >= 1, got {self.num_prefixes}")

    def system_prompt(self, group: int) -> str:
        """The shared system prompt of prefix group `group`, deterministic."""
        rng = random.Random(group)
        text = f"You are the assistant for {_TOPICS[group % len(_TOPICS)]} (policy set {group}). "
        while len(text) < self.prefix_chars:
            text += rng.choice(_SENTENCES) + " "
        return text[: self.prefix_chars]

    def messages(self, group: int, rng: random.Random) -> list[dict[str, str]]:
        question = f"Question {rng.randrange(10**9)}: "
        while len(question) < self.question_chars:
            question += rng.choice(("what", "does", "the", "policy", "say", "about", "case")) + " "
        return [
            {"role": "system", "content": self.system_prompt(group)},
            {"role": "user", "content": question.strip()},
        ]


@attrs.frozen
class LoadSpec:
    """What load to send where."""

    base_url: str
    model: str
    concurrency: int = 8
    duration_s: float | None = 10.0
    num_requests: int | None = None
    rate_per_s: float | None = None
    """Poisson arrival rate (open loop); None keeps `concurrency` requests in flight (closed)."""
    stream_fraction: float = 0.5
    max_tokens: int = 32
    mix: PromptMix = PromptMix()
    api: Literal["chat", "completion"] = "chat"
    timeout_s: float = 120.0
    seed: int = 0
    headers: tuple[tuple[str, str], ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.duration_s is None and self.num_requests is None:
            raise ValueError("set duration_s or num_requests (or both)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0.0 <= self.stream_fraction <= 1.0:
            raise ValueError(f"stream_fraction must be in [0, 1], got {self.stream_fraction}")


@attrs.frozen
class RequestRecord:
    """The outcome of one request as the client saw it."""

    ok: bool
    status: int
    stream: bool
    prefix_group: int
    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    itls_s: tuple[float, ...] = ()
    completion_tokens: int = 0
    response_id: str = ""
    error: str = ""
    request_id: str = ""
    """The `X-Request-Id` the request was sent with (`<seed>-<index>`, unique in a run)."""
    index: int = -1
    """Position of the request in the trace (0 first), the same for every run of a seed."""
    cached_tokens: int | None = None
    """usage.prompt_tokens_details.cached_tokens, where the server reports it (vLLM with
    `--enable-prompt-tokens-details`), else None."""


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def replica_tag_of(response_id: str) -> str:
    """The emulator's replica tag inside a response id (`chatcmpl-TAG-hex`), or ''."""
    parts = response_id.split("-")
    return "-".join(parts[1:-1]) if len(parts) > 2 else ""


@attrs.frozen
class LatencySummary:
    requests: int
    ok: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None
    e2e_p99_s: float | None


def summarize(records: Sequence[RequestRecord]) -> LatencySummary:
    """Percentiles over the successful requests (TTFT and ITL from streamed ones)."""
    good = [r for r in records if r.ok]
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    itls = [itl for r in good for itl in r.itls_s]
    e2es = [r.e2e_s for r in good]
    return LatencySummary(
        requests=len(records),
        ok=len(good),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        itl_p95_s=percentile(itls, 95),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p95_s=percentile(e2es, 95),
        e2e_p99_s=percentile(e2es, 99),
    )


@attrs.frozen
class LoadReport:
    records: tuple[RequestRecord, ...]
    wall_s: float

    @property
    def summary(self) -> LatencySummary:
        return summarize(self.records)

    @property
    def ok_per_s(self) -> float:
        return sum(1 for r in self.records if r.ok) / self.wall_s if self.wall_s > 0 else 0.0

    def by_replica(self) -> dict[str, list[RequestRecord]]:
        """Records grouped by the replica tag in their response id ('' when unknown)."""
        groups: dict[str, list[RequestRecord]] = {}
        for record in self.records:
            groups.setdefault(replica_tag_of(record.response_id), []).append(record)
        return groups


class _Client:
    """Sends one request and times it."""

    def __init__(self, spec: LoadSpec, session: aiohttp.ClientSession) -> None:
        self.spec = spec
        self.session = session
        path = "/v1/chat/completions" if spec.api == "chat" else "/v1/completions"
        self.url = spec.base_url.rstrip("/") + path
        self.headers = {"Content-Type": "application/json", **dict(spec.headers)}

    def body(self, group: int, stream: bool, rng: random.Random) -> dict[str, Any]:
        messages = self.spec.mix.messages(group, rng)
        body: dict[str, Any] = {"model": self.spec.model, "max_tokens": self.spec.max_tokens}
        if self.spec.api == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = "\n".join(m["content"] for m in messages)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def send(
        self, group: int, stream: bool, rng: random.Random, index: int = -1
    ) -> RequestRecord:
        payload = json.dumps(self.body(group, stream, rng)).encode()
        request_id = f"{self.spec.seed}-{index}"
        headers = {"X-Request-Id": request_id, **self.headers}
        start = time.perf_counter()
        base = RequestRecord(
            ok=False,
            status=0,
            stream=stream,
            prefix_group=group,
            start_s=start,
            e2e_s=0.0,
            request_id=request_id,
            index=index,
        )
        try:
            async with self.session.post(self.url, data=payload, headers=headers) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:300]
                    return attrs.evolve(
                        base, status=resp.status, error=text, e2e_s=time.perf_counter() - start
                    )
                if not stream:
                    data = await resp.json(content_type=None)
                    usage = data.get("usage") or {}
                    return attrs.evolve(
                        base,
                        ok=True,
                        status=200,
                        e2e_s=time.perf_counter() - start,
                        completion_tokens=int(usage.get("completion_tokens", 0)),
                        response_id=str(data.get("id", "")),
                        cached_tokens=_cached_tokens(usage),
                    )
                return await self._read_stream(resp, start, base)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return attrs.evolve(
                base, error=f"{type(exc).__name__}: {exc}", e2e_s=time.perf_counter() - start
            )

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, start: float, base: RequestRecord
    ) -> RequestRecord:
        token_times: list[float] = []
        response_id = ""
        completion_tokens = 0
        cached_tokens: int | None = None
        done = False
        error = ""
        async for raw_line in resp.content:
            line = raw_line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                error = json.dumps(chunk["error"])[:300]
                continue
            response_id = response_id or str(chunk.get("id", ""))
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
                if text:
                    token_times.append(time.perf_counter())
            usage = chunk.get("usage")
            if usage:
                completion_tokens = int(usage.get("completion_tokens", 0))
                cached_tokens = _cached_tokens(usage)
        end = time.perf_counter()
        ok = done and not error and bool(token_times)
        return attrs.evolve(
            base,
            ok=ok,
            status=200,
            e2e_s=end - start,
            ttft_s=token_times[0] - start if token_times else None,
            itls_s=tuple(b - a for a, b in itertools.pairwise(token_times)),
            completion_tokens=completion_tokens or len(token_times),
            response_id=response_id,
            error=error or ("" if done else "stream ended without [DONE]"),
            cached_tokens=cached_tokens,
        )


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens`; None when the server does not report it,
    0 when it reports details without a cached count (vLLM omits the details at 0)."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    value = details.get("cached_tokens")
    return int(value) if isinstance(value, int) else 0


async def run_load(
    spec: LoadSpec,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadReport:
    """Send `spec`'s load and return every request's record; `on_record` sees each one live."""
    rng = random.Random(spec.seed)
    records: list[RequestRecord] = []
    started = time.perf_counter()
    deadline = started + spec.duration_s if spec.duration_s is not None else math.inf
    issued = 0

    def next_request() -> tuple[int, bool, random.Random, int] | None:
        nonlocal issued
        if time.perf_counter() >= deadline:
            return None
        if spec.num_requests is not None and issued >= spec.num_requests:
            return None
        issued += 1
        group = rng.randrange(spec.mix.num_prefixes)
        return group, rng.random() < spec.stream_fraction, random.Random(rng.random()), issued - 1

    def keep(record: RequestRecord) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=spec.concurrency, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        client = _Client(spec, session)
        if spec.rate_per_s is None:

            async def worker() -> None:
                while (job := next_request()) is not None:
                    keep(await client.send(*job))

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        else:
            slots = asyncio.Semaphore(spec.concurrency)
            tasks: set[asyncio.Task[None]] = set()

            async def one(job: tuple[int, bool, random.Random, int]) -> None:
                async with slots:
                    keep(await client.send(*job))

            next_at = time.perf_counter()
            while (job := next_request()) is not None:
                task = asyncio.create_task(one(job))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += rng.expovariate(spec.rate_per_s)
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if tasks:
                await asyncio.gather(*tasks)
    return LoadReport(records=tuple(records), wall_s=time.perf_counter() - started)

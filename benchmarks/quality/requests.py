"""Per-request diagnostics: which replica served each request, cold or warm, and where its TTFT
went (waiting for a hedge, queue wait, prefill, or outside the engine: router, network, client).

Pure functions: the client's records (`RequestRecord`, with the `X-Request-Id` it sent and the
`usage.prompt_tokens_details.cached_tokens` it got back) are joined with the emulators' dev-only
`GET /dev/requests` entries (the engine's queue and prefill times, keyed by the same request id
and by the response id). A request id logged by several replicas was hedged (or retried) by the
router: the replica whose answer the client got is the one with its response id, and the time
from the first attempt's arrival to that one's is the hedge wait. `tail_summary` says what the
slowest 5% of each mode were.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from infermesh.dev.loadgen import RequestRecord, percentile, replica_tag_of

__all__ = [
    "WARM_SHARE",
    "PerRequest",
    "join_requests",
    "render_tail",
    "tail_summary",
    "to_jsonl",
]

WARM_SHARE = 0.5
"""A request is `warm` when at least this share of its prompt was a prefix-cache hit."""
TAIL_PERCENTILE = 95.0


@dataclass(frozen=True, slots=True)
class PerRequest:
    """One request of one mode's trace, as the client and the replica that served it saw it.
    Times in milliseconds; None where the replica's log has no entry for the request."""

    seed: int
    mode: str
    index: int
    request_id: str
    tenant: int
    ok: bool
    replica: str
    ttft_ms: float | None
    e2e_ms: float
    prompt_tokens: int | None
    cached_tokens: int | None
    cache: str
    """`warm` (>= WARM_SHARE of the prompt cached), `cold`, or `unknown`."""
    attempts: int
    """Replicas that logged the request (2 or more: the router hedged or retried it; 0: none)."""
    tried: tuple[str, ...]
    """The replicas that logged it, first attempt first (the first is where the router sent it)."""
    hedge_wait_ms: float | None
    """From the first attempt's arrival at a replica to the answering one's (0 when one)."""
    queue_ms: float | None
    prefill_ms: float | None
    outside_engine_ms: float | None
    """Client TTFT minus the hedge wait and the engine's TTFT (arrival to first token):
    router, network and client."""
    waiting_at_arrival: int | None
    running_at_arrival: int | None
    preemptions: int | None


def _ms(seconds: object) -> float | None:
    return round(float(seconds) * 1000.0, 2) if isinstance(seconds, int | float) else None


def _arrival(entry: Mapping[str, object]) -> float | None:
    value = entry.get("arrived_unix_s")
    return float(value) if isinstance(value, int | float) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def join_requests(
    seed: int,
    mode: str,
    records: Sequence[RequestRecord],
    replica_logs: Iterable[Sequence[Mapping[str, object]]],
) -> list[PerRequest]:
    """Each record with its replica's log entry (matched on response id, else on X-Request-Id;
    a request a router hedged or retried has entries at several replicas: the one whose answer
    the client got is the one with its response id), in trace order."""
    by_response: dict[str, Mapping[str, object]] = {}
    by_request: dict[str, list[Mapping[str, object]]] = {}
    for log in replica_logs:
        for entry in log:
            response_id = entry.get("response_id")
            if isinstance(response_id, str) and response_id:
                by_response[response_id] = entry
            request_id = entry.get("x_request_id")
            if isinstance(request_id, str) and request_id:
                by_request.setdefault(request_id, []).append(entry)
    rows = []
    for record in sorted(records, key=lambda r: r.index):
        tried = by_request.get(record.request_id, [])
        answered = [e for e in tried if e.get("finish_reason") != "abort"]
        entry = by_response.get(record.response_id) or (answered[0] if answered else {})
        arrivals = [at for e in tried if (at := _arrival(e)) is not None]
        order = sorted(tried, key=lambda e: _arrival(e) or 0.0)
        tried_tags = tuple(replica_tag_of(str(e.get("response_id", ""))) or "?" for e in order)
        arrived = entry.get("arrived_unix_s")
        hedge_wait = (
            round((float(arrived) - min(arrivals)) * 1000.0, 2)
            if isinstance(arrived, int | float) and arrivals
            else None
        )
        prompt = _int(entry.get("prompt_tokens"))
        cached = record.cached_tokens
        if cached is None:
            cached = _int(entry.get("cached_tokens"))
        engine_ttft = entry.get("ttft_s")
        outside = (
            round((record.ttft_s - float(engine_ttft)) * 1000.0 - (hedge_wait or 0.0), 2)
            if record.ttft_s is not None and isinstance(engine_ttft, int | float)
            else None
        )
        if cached is None or not prompt:
            cache = "unknown"
        else:
            cache = "warm" if cached >= WARM_SHARE * prompt else "cold"
        rows.append(
            PerRequest(
                seed=seed,
                mode=mode,
                index=record.index,
                request_id=record.request_id,
                tenant=record.prefix_group,
                ok=record.ok,
                replica=replica_tag_of(record.response_id) or "?",
                ttft_ms=_ms(record.ttft_s),
                e2e_ms=round(record.e2e_s * 1000.0, 2),
                prompt_tokens=prompt,
                cached_tokens=cached,
                cache=cache,
                attempts=len(tried) or (1 if entry else 0),
                tried=tried_tags,
                hedge_wait_ms=hedge_wait,
                queue_ms=_ms(entry.get("queue_s")),
                prefill_ms=_ms(entry.get("prefill_s")),
                outside_engine_ms=outside,
                waiting_at_arrival=_int(entry.get("waiting_at_arrival")),
                running_at_arrival=_int(entry.get("running_at_arrival")),
                preemptions=_int(entry.get("preemptions")),
            )
        )
    return rows


def to_jsonl(rows: Iterable[PerRequest]) -> str:
    """One JSON object a line (the `--per-request` file)."""
    return "".join(json.dumps(asdict(row), separators=(",", ":")) + "\n" for row in rows)


@dataclass(frozen=True, slots=True)
class Tail:
    """What a mode's slowest requests (TTFT at or above its p95) were."""

    mode: str
    threshold_ms: float
    count: int
    cache: Mapping[str, int]
    replicas: Mapping[str, int]
    hedged: int
    """How many of them the router hedged or retried (logged by two or more replicas)."""
    hedge_wait_ms: float | None
    queue_ms: float | None
    prefill_ms: float | None
    outside_engine_ms: float | None
    """Medians over the tail's requests."""


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def tail_summary(rows: Sequence[PerRequest]) -> list[Tail]:
    """Per mode (in first-seen order): its requests with TTFT >= its p95 TTFT."""
    modes = list(dict.fromkeys(row.mode for row in rows))
    tails = []
    for mode in modes:
        timed = [r for r in rows if r.mode == mode and r.ok and r.ttft_ms is not None]
        threshold = percentile((r.ttft_ms for r in timed if r.ttft_ms is not None), TAIL_PERCENTILE)
        if threshold is None:
            continue
        slow = [r for r in timed if r.ttft_ms is not None and r.ttft_ms >= threshold]
        tails.append(
            Tail(
                mode=mode,
                threshold_ms=threshold,
                count=len(slow),
                cache=dict(Counter(r.cache for r in slow).most_common()),
                replicas=dict(Counter(r.replica for r in slow).most_common()),
                hedged=sum(1 for r in slow if r.attempts > 1),
                hedge_wait_ms=_median(r.hedge_wait_ms for r in slow if r.attempts > 1),
                queue_ms=_median(r.queue_ms for r in slow),
                prefill_ms=_median(r.prefill_ms for r in slow),
                outside_engine_ms=_median(r.outside_engine_ms for r in slow),
            )
        )
    return tails


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def render_tail(tails: Sequence[Tail]) -> str:
    """The tail in words: one paragraph a mode."""
    lines = [
        f"tail: each mode's requests with TTFT >= its p{TAIL_PERCENTILE:g} "
        f"(warm: >= {WARM_SHARE:.0%} of the prompt a prefix-cache hit; hedged: sent to 2+ "
        "replicas; medians in ms)"
    ]
    for tail in tails:
        cache = ", ".join(f"{kind} {n}" for kind, n in tail.cache.items())
        replicas = ", ".join(f"{tag} {n}" for tag, n in tail.replicas.items())
        hedged = (
            f"hedged {tail.hedged} (waited {_fmt(tail.hedge_wait_ms)})"
            if tail.hedged
            else "hedged 0"
        )
        lines.append(
            f"  {tail.mode:<24} {tail.count} requests >= {tail.threshold_ms:.0f} ms: {cache}; "
            f"{hedged}; {replicas}; queue {_fmt(tail.queue_ms)}, "
            f"prefill {_fmt(tail.prefill_ms)}, outside the engine {_fmt(tail.outside_engine_ms)}"
        )
    return "\n".join(lines)

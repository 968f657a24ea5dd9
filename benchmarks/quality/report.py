"""Turn each mode's request records into the routing-quality table, goals and one JSON line.

Pure functions over records: no I/O except the strings they return. Latency figures are over
the successful requests of the measured trace; TTFT comes from streamed requests only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.quality.window import ArrivalWindow, arrival_window
from infermesh.dev.loadgen import LoadReport, replica_tag_of, summarize

__all__ = [
    "GOAL_P95_VS_BEST_PEER",
    "GOAL_P95_VS_ROUND_ROBIN",
    "ROUND_ROBIN",
    "Row",
    "goals",
    "render_goals",
    "render_json",
    "render_table",
    "row_from_report",
    "row_from_reports",
]

ROUND_ROBIN = "vllm-router round_robin"
INFERMESH = "infermesh"
GOAL_P95_VS_ROUND_ROBIN = 0.5
GOAL_P95_VS_BEST_PEER = 0.8


@dataclass(frozen=True, slots=True)
class Row:
    """One mode's figures over the trace. Latencies in milliseconds; NaN when unknown."""

    mode: str
    requests: int
    ok: int
    errors: int
    first_error: str
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    e2e_p50_ms: float
    e2e_p95_ms: float
    e2e_p99_ms: float
    ok_per_s: float
    output_tokens_per_s: float
    wall_s: float
    window_s: float
    """The arrival window, first send to last send (summed over the traces when pooled)."""
    sent_per_s: float
    """Requests sent per second within the arrival window (the offered rate as achieved)."""
    window_tokens_per_s: float
    """`tok/s arr`: output tokens delivered within the arrival window over it (see
    benchmarks/quality/window.py); NaN for an empty window."""
    share_by_replica: Mapping[str, float]
    """Share of the successful requests each replica (by its response-id tag) answered."""


def _ms(value: float | None) -> float:
    return math.nan if value is None else value * 1000.0


def row_from_report(mode: str, report: LoadReport) -> Row:
    return row_from_reports(mode, (report,))


def row_from_reports(mode: str, reports: Sequence[LoadReport]) -> Row:
    """One mode's row over one trace, or pooled over several (e.g. one per seed): latency
    percentiles over every request of them all, rates over their summed wall time, `tok/s arr`
    as the tokens delivered in each trace's arrival window over the windows' summed length."""
    window = sum((arrival_window(each.records) for each in reports), ArrivalWindow(0.0, 0.0))
    report = LoadReport(
        records=tuple(r for each in reports for r in each.records),
        wall_s=sum(each.wall_s for each in reports),
    )
    summary = summarize(report.records)
    good = [r for r in report.records if r.ok]
    first_error = next((f"HTTP {r.status}: {r.error}" for r in report.records if not r.ok), "")
    counts: dict[str, int] = {}
    for record in good:
        tag = replica_tag_of(record.response_id) or "?"
        counts[tag] = counts.get(tag, 0) + 1
    share = {tag: counts[tag] / len(good) for tag in sorted(counts)}
    wall_s = report.wall_s
    tokens = sum(r.completion_tokens for r in good)
    return Row(
        mode=mode,
        requests=summary.requests,
        ok=summary.ok,
        errors=summary.requests - summary.ok,
        first_error=first_error[:300],
        ttft_p50_ms=_ms(summary.ttft_p50_s),
        ttft_p95_ms=_ms(summary.ttft_p95_s),
        ttft_p99_ms=_ms(summary.ttft_p99_s),
        e2e_p50_ms=_ms(summary.e2e_p50_s),
        e2e_p95_ms=_ms(summary.e2e_p95_s),
        e2e_p99_ms=_ms(summary.e2e_p99_s),
        ok_per_s=len(good) / wall_s if wall_s > 0 else math.nan,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else math.nan,
        wall_s=wall_s,
        window_s=window.window_s,
        sent_per_s=window.sends_per_s,
        window_tokens_per_s=window.tokens_per_s,
        share_by_replica=share,
    )


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def render_table(rows: Sequence[Row]) -> str:
    """A fixed-width table, one line per mode, then each mode's split over the replicas."""
    header = (
        f"{'mode':<24} {'ok':>5} {'err':>4} {'TTFT p50':>9} {'p95':>7} {'p99':>7} "
        f"{'e2e p50':>8} {'p95':>7} {'p99':>7} {'req/s':>6} {'tok/s':>7} "
        f"{'sent/s':>6} {'tok/s arr':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.mode:<24} {row.ok:>5} {row.errors:>4} {_fmt(row.ttft_p50_ms):>9} "
            f"{_fmt(row.ttft_p95_ms):>7} {_fmt(row.ttft_p99_ms):>7} {_fmt(row.e2e_p50_ms):>8} "
            f"{_fmt(row.e2e_p95_ms):>7} {_fmt(row.e2e_p99_ms):>7} {_fmt(row.ok_per_s, 2):>6} "
            f"{_fmt(row.output_tokens_per_s):>7} {_fmt(row.sent_per_s, 2):>6} "
            f"{_fmt(row.window_tokens_per_s):>9}"
        )
    lines += ["", "share of requests per replica:"]
    for row in rows:
        split = "  ".join(f"{tag} {share:.0%}" for tag, share in row.share_by_replica.items())
        lines.append(f"  {row.mode:<24} {split or '-'}")
    return "\n".join(lines)


def _best_peer(rows: Sequence[Row]) -> Row | None:
    peers = [r for r in rows if r.mode != INFERMESH and not math.isnan(r.ttft_p95_ms)]
    return min(peers, key=lambda r: r.ttft_p95_ms) if peers else None


def _best_peer_throughput(rows: Sequence[Row]) -> Row | None:
    peers = [r for r in rows if r.mode != INFERMESH and not math.isnan(r.window_tokens_per_s)]
    return max(peers, key=lambda r: r.window_tokens_per_s) if peers else None


def _throughput_ge_best_peer(ours: Row, rows: Sequence[Row]) -> bool | None:
    """Throughput during arrivals (`tok/s arr`) no lower than the best peer's; None when
    either is unknown."""
    best = _best_peer_throughput(rows)
    if best is None or math.isnan(ours.window_tokens_per_s):
        return None
    return ours.window_tokens_per_s >= best.window_tokens_per_s


def _render_throughput(ours: Row, rows: Sequence[Row], verdict: str) -> str:
    best = _best_peer_throughput(rows)
    if best is None or math.isnan(ours.window_tokens_per_s) or best.window_tokens_per_s <= 0:
        return "  tok/s arr: - (no arrival window)"
    best_rps = max(r.ok_per_s for r in rows if r.mode != INFERMESH)
    ratio = ours.window_tokens_per_s / best.window_tokens_per_s
    return (
        f"  tok/s arr {ours.window_tokens_per_s:.0f} vs best peer ({best.mode}) "
        f"{best.window_tokens_per_s:.0f}: {ratio:.3f}x"
        f"  {verdict}  (req/s, not judged: {ours.ok_per_s:.2f} vs best peer {best_rps:.2f})"
    )


def goals(rows: Sequence[Row]) -> dict[str, bool | None]:
    """The issue's goals for the InferMesh router on this trace; None where not measurable."""
    ours = next((r for r in rows if r.mode == INFERMESH), None)
    rr = next((r for r in rows if r.mode == ROUND_ROBIN), None)
    best = _best_peer(rows)
    result: dict[str, bool | None] = {
        f"ttft_p95_le_{GOAL_P95_VS_ROUND_ROBIN:g}x_round_robin": None,
        f"ttft_p95_le_{GOAL_P95_VS_BEST_PEER:g}x_best_peer": None,
        "throughput_ge_best_peer": None,
    }
    if ours is None or math.isnan(ours.ttft_p95_ms):
        return result
    if rr is not None and not math.isnan(rr.ttft_p95_ms):
        key = f"ttft_p95_le_{GOAL_P95_VS_ROUND_ROBIN:g}x_round_robin"
        result[key] = ours.ttft_p95_ms <= GOAL_P95_VS_ROUND_ROBIN * rr.ttft_p95_ms
    if best is not None:
        key = f"ttft_p95_le_{GOAL_P95_VS_BEST_PEER:g}x_best_peer"
        result[key] = ours.ttft_p95_ms <= GOAL_P95_VS_BEST_PEER * best.ttft_p95_ms
        result["throughput_ge_best_peer"] = _throughput_ge_best_peer(ours, rows)
    return result


def render_goals(rows: Sequence[Row]) -> str:
    """The goals in words, with the ratios that decide them."""
    ours = next((r for r in rows if r.mode == INFERMESH), None)
    rr = next((r for r in rows if r.mode == ROUND_ROBIN), None)
    best = _best_peer(rows)
    lines = [
        f"goals (InferMesh): TTFT p95 <= {GOAL_P95_VS_ROUND_ROBIN:g} x round robin's and "
        f"<= {GOAL_P95_VS_BEST_PEER:g} x the best peer's; tok/s arr >= the best peer's"
    ]
    if ours is None or math.isnan(ours.ttft_p95_ms):
        return "\n".join([*lines, "  - (InferMesh not measured)"])
    verdict = goals(rows)

    def word(key: str) -> str:
        value = verdict[key]
        return "-" if value is None else ("met" if value else "MISSED")

    if rr is not None and rr.ttft_p95_ms > 0:
        key = f"ttft_p95_le_{GOAL_P95_VS_ROUND_ROBIN:g}x_round_robin"
        lines.append(f"  vs round robin: {ours.ttft_p95_ms / rr.ttft_p95_ms:.2f}x  {word(key)}")
    if best is not None and best.ttft_p95_ms > 0:
        key = f"ttft_p95_le_{GOAL_P95_VS_BEST_PEER:g}x_best_peer"
        lines.append(
            f"  vs best peer ({best.mode}): {ours.ttft_p95_ms / best.ttft_p95_ms:.2f}x  {word(key)}"
        )
        lines.append(_render_throughput(ours, rows, word("throughput_ge_best_peer")))
    return "\n".join(lines)


def _num(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def render_json(
    rows: Sequence[Row], *, settings: Mapping[str, object], skipped: Mapping[str, str]
) -> str:
    """The one machine-readable line: every figure, the settings, what was skipped and why."""
    results = [
        {
            "mode": r.mode,
            "requests": r.requests,
            "ok": r.ok,
            "errors": r.errors,
            "first_error": r.first_error,
            "ttft_ms": {
                "p50": _num(r.ttft_p50_ms),
                "p95": _num(r.ttft_p95_ms),
                "p99": _num(r.ttft_p99_ms),
            },
            "e2e_ms": {
                "p50": _num(r.e2e_p50_ms),
                "p95": _num(r.e2e_p95_ms),
                "p99": _num(r.e2e_p99_ms),
            },
            "ok_per_s": _num(r.ok_per_s, 3),
            "output_tokens_per_s": _num(r.output_tokens_per_s),
            "wall_s": _num(r.wall_s, 2),
            "window_s": _num(r.window_s, 2),
            "sent_per_s": _num(r.sent_per_s, 3),
            "window_tokens_per_s": _num(r.window_tokens_per_s),
            "share_by_replica": {tag: round(s, 4) for tag, s in r.share_by_replica.items()},
        }
        for r in rows
    ]
    line = {
        "benchmark": "routing_quality",
        "settings": dict(settings),
        "results": results,
        "goals": goals(rows),
        "skipped": dict(skipped),
    }
    return json.dumps(line, separators=(",", ":"))

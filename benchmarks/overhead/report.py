"""Turn repeated load phases into the benchmark's table and its one JSON line.

Pure functions over numbers: no I/O except the strings they return. Every figure is the median
over repeats of that repeat's own statistic (p50 of a repeat, p99 of a repeat, req/s of a repeat).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchmarks.overhead.loadgen import LoadResult

__all__ = [
    "CPU_ROLES",
    "Phase",
    "Row",
    "Sample",
    "render_goals",
    "render_json",
    "render_table",
    "rows_from_results",
]

DIRECT = "direct"
INFERMESH = "infermesh"
"""The product router as `infermesh router run` starts it (local scoring)."""
INFERMESH_AGENT = "infermesh agent-scoring"
"""The same router with `--scoring agent`: one ScoreTargets call to the agent per request."""
VLLM_ROUTER = "vllm-router"


@dataclass(frozen=True, slots=True)
class Phase:
    """One kind of load: non-streaming or streaming chat at one concurrency."""

    stream: bool
    concurrency: int

    @property
    def name(self) -> str:
        return f"{'stream' if self.stream else 'chat'} c{self.concurrency}"

    @property
    def key(self) -> str:
        return f"{'stream' if self.stream else 'chat'}_c{self.concurrency}"


CPU_ROLES = ("proxy", "agent", "emulators", "loadgen")
"""Who spent CPU: the mode's router (or vllm-router), the InferMesh agent, all emulators, and
the load generator itself."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One repeat of one mode under one phase: the load figures and CPU per request by role."""

    load: LoadResult
    cpu_us_per_request: Mapping[str, float]
    """CPU microseconds per completed request for each of `CPU_ROLES` that exists in the mode."""


@dataclass(frozen=True, slots=True)
class Row:
    """Median figures of one mode under one phase, and how they compare."""

    mode: str
    phase: Phase
    repeats: int
    requests: int
    errors: int
    first_error: str
    rps: float
    p50_ms: float
    p99_ms: float
    ttft_p50_ms: float
    added_p50_ms: float
    added_p99_ms: float
    ratio_to_vllm_router: float
    """req/s of this mode over vllm-router's req/s in the same phase (NaN without vllm-router)."""
    cpu_us_per_request: Mapping[str, float]
    """Median CPU microseconds per request by role (see `CPU_ROLES`); NaN when unknown."""


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def rows_from_results(
    results: Mapping[tuple[str, Phase], Sequence[Sample]],
) -> list[Row]:
    """One Row per (mode, phase), in insertion order, with the comparisons filled in."""
    medians: dict[tuple[str, Phase], tuple[float, float, float, float]] = {}
    for key, samples in results.items():
        repeats = [sample.load for sample in samples]
        medians[key] = (
            _median([r.throughput_rps for r in repeats]),
            _median([r.latency_ms(50) for r in repeats]),
            _median([r.latency_ms(99) for r in repeats]),
            _median([r.ttft_ms(50) for r in repeats]),
        )
    rows: list[Row] = []
    for (mode, phase), samples in results.items():
        repeats = [sample.load for sample in samples]
        rps, p50, p99, ttft = medians[(mode, phase)]
        cpu = {
            role: _median([s.cpu_us_per_request.get(role, math.nan) for s in samples])
            for role in CPU_ROLES
        }
        direct = medians.get((DIRECT, phase))
        vllm_router = medians.get((VLLM_ROUTER, phase))
        rows.append(
            Row(
                mode=mode,
                phase=phase,
                repeats=len(repeats),
                requests=sum(r.requests for r in repeats),
                errors=sum(r.errors for r in repeats),
                first_error=next((r.first_error for r in repeats if r.first_error), ""),
                rps=rps,
                p50_ms=p50,
                p99_ms=p99,
                ttft_p50_ms=ttft,
                added_p50_ms=p50 - direct[1] if direct else math.nan,
                added_p99_ms=p99 - direct[2] if direct else math.nan,
                ratio_to_vllm_router=rps / vllm_router[0]
                if vllm_router and vllm_router[0] > 0
                else math.nan,
                cpu_us_per_request=cpu,
            )
        )
    return rows


def _fmt(value: float, digits: int = 2, signed: bool = False) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render_table(rows: Sequence[Row]) -> str:
    """A fixed-width table: one line per (phase, mode), phases grouped."""
    header = (
        f"{'phase':<10} {'mode':<26} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'+p99 ms':>8} {'x vllm-router':>13} {'proxy us':>8} "
        f"{'agent us':>8} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    ordered = sorted(rows, key=lambda r: (-r.phase.concurrency, r.phase.stream))
    previous: Phase | None = None
    for row in ordered:
        if previous is not None and row.phase != previous:
            lines.append("")
        previous = row.phase
        show_ratio = row.mode not in (DIRECT, VLLM_ROUTER)
        lines.append(
            f"{row.phase.name:<10} {row.mode:<26} {_fmt(row.rps, 0):>8} {_fmt(row.p50_ms):>8} "
            f"{_fmt(row.p99_ms):>8} "
            f"{_fmt(row.added_p50_ms, signed=True) if row.mode != DIRECT else '':>8} "
            f"{_fmt(row.added_p99_ms, signed=True) if row.mode != DIRECT else '':>8} "
            f"{_fmt(row.ratio_to_vllm_router) if show_ratio else '':>13} "
            f"{_fmt(row.cpu_us_per_request['proxy'], 0):>8} "
            f"{_fmt(row.cpu_us_per_request['agent'], 0):>8}"
            f" {row.errors:>6}"
        )
    return "\n".join(lines)


def render_goals(
    rows: Sequence[Row], goal_added_p50_ms: float = 1.0, goal_ratio: float = 0.5
) -> str:
    """The issue's goals for the InferMesh router, phase by phase, in words."""
    lines = [
        f"goals (InferMesh router): added p50 <= {goal_added_p50_ms:g} ms over direct; "
        f"req/s >= {goal_ratio:g} x vllm-router's"
    ]
    for row in rows:
        if row.mode != INFERMESH:
            continue
        latency = (
            "-"
            if math.isnan(row.added_p50_ms)
            else f"{'met' if row.added_p50_ms <= goal_added_p50_ms else 'MISSED'} "
            f"({row.added_p50_ms:+.2f} ms)"
        )
        ratio = (
            "- (no vllm-router)"
            if math.isnan(row.ratio_to_vllm_router)
            else f"{'met' if row.ratio_to_vllm_router >= goal_ratio else 'MISSED'} "
            f"({row.ratio_to_vllm_router:.2f}x)"
        )
        lines.append(f"  {row.phase.name:<10} added p50 {latency:<20} throughput {ratio}")
    return "\n".join(lines)


def _json_number(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def render_json(
    rows: Sequence[Row],
    *,
    settings: Mapping[str, object],
    skipped: Mapping[str, str],
    goal_added_p50_ms: float = 1.0,
    goal_ratio: float = 0.5,
) -> str:
    """The one machine-readable line: every figure, the settings, what was skipped and why."""
    results = [
        {
            "mode": row.mode,
            "phase": row.phase.key,
            "stream": row.phase.stream,
            "concurrency": row.phase.concurrency,
            "repeats": row.repeats,
            "requests": row.requests,
            "errors": row.errors,
            "rps": _json_number(row.rps, 1),
            "p50_ms": _json_number(row.p50_ms),
            "p99_ms": _json_number(row.p99_ms),
            "ttft_p50_ms": _json_number(row.ttft_p50_ms),
            "added_p50_ms": _json_number(row.added_p50_ms),
            "added_p99_ms": _json_number(row.added_p99_ms),
            "ratio_to_vllm_router": _json_number(row.ratio_to_vllm_router),
            "cpu_us_per_request": {
                role: _json_number(value, 1) for role, value in row.cpu_us_per_request.items()
            },
        }
        for row in rows
    ]
    goals: dict[str, bool | None] = {}
    for row in rows:
        if row.mode != INFERMESH:
            continue
        goals[f"added_p50_le_{goal_added_p50_ms:g}ms_{row.phase.key}"] = (
            None if math.isnan(row.added_p50_ms) else row.added_p50_ms <= goal_added_p50_ms
        )
        goals[f"rps_ge_{goal_ratio:g}x_vllm_router_{row.phase.key}"] = (
            None if math.isnan(row.ratio_to_vllm_router) else row.ratio_to_vllm_router >= goal_ratio
        )
    line = {
        "benchmark": "router_overhead",
        "settings": dict(settings),
        "results": results,
        "goals": goals,
        "skipped": dict(skipped),
    }
    return json.dumps(line, separators=(",", ":"), sort_keys=False)

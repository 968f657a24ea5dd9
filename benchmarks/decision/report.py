"""Turn per-decision latencies into the decision-cost table, the goal verdict and a JSON line.

Pure functions: no I/O except the strings they return.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from infermesh.dev.loadgen import percentile

__all__ = ["GOAL_P99_MS", "Row", "goal_met", "render_json", "render_table", "row_from_samples"]

GOAL_P99_MS = 1.0
"""The issue's goal: ScoreTargets p99 under 1 ms in-process at 10,000 candidates."""
GOAL_CANDIDATES = 10_000
IN_PROCESS = "in-process"
UDS = "agent uds"


@dataclass(frozen=True, slots=True)
class Row:
    path: str
    """`in-process` (ScoringEngine.rank) or `agent uds` (ScoreTargets over the agent's socket)."""
    candidates: int
    decisions: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    cpu_p50_ms: float = math.nan
    """The deciding thread's CPU time per decision (in-process only): the decision's cost
    without the time the thread waited for a CPU on a shared machine."""
    cpu_p99_ms: float = math.nan


def row_from_samples(
    path: str,
    candidates: int,
    latencies_s: Sequence[float],
    cpu_s: Sequence[float] = (),
) -> Row:
    def ms(samples: Sequence[float], q: float) -> float:
        value = percentile(samples, q) if samples else None
        return math.nan if value is None else value * 1000.0

    mean = sum(latencies_s) / len(latencies_s) * 1000.0 if latencies_s else math.nan
    return Row(
        path,
        candidates,
        len(latencies_s),
        ms(latencies_s, 50),
        ms(latencies_s, 99),
        ms(latencies_s, 100),
        mean,
        ms(cpu_s, 50),
        ms(cpu_s, 99),
    )


def goal_met(rows: Sequence[Row]) -> bool | None:
    """p99 < GOAL_P99_MS in-process at 10,000 candidates; None when that was not measured."""
    for row in rows:
        if row.path == IN_PROCESS and row.candidates == GOAL_CANDIDATES:
            return None if math.isnan(row.p99_ms) else row.p99_ms < GOAL_P99_MS
    return None


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def render_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'path':<11} {'candidates':>10} {'decisions':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'mean ms':>8} {'cpu p50':>8} {'cpu p99':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.path:<11} {row.candidates:>10} {row.decisions:>9} {_fmt(row.p50_ms):>8} "
            f"{_fmt(row.p99_ms):>8} {_fmt(row.max_ms):>8} {_fmt(row.mean_ms):>8} "
            f"{_fmt(row.cpu_p50_ms):>8} {_fmt(row.cpu_p99_ms):>8}"
        )
    met = goal_met(rows)
    verdict = "- (not measured)" if met is None else ("met" if met else "MISSED")
    lines += [
        "",
        f"goal: in-process p99 < {GOAL_P99_MS:g} ms at {GOAL_CANDIDATES:,} candidates: {verdict}",
    ]
    return "\n".join(lines)


def _num(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)


def render_json(
    rows: Sequence[Row], *, settings: Mapping[str, object], skipped: Mapping[str, str]
) -> str:
    line = {
        "benchmark": "decision_cost",
        "settings": dict(settings),
        "results": [
            {
                "path": r.path,
                "candidates": r.candidates,
                "decisions": r.decisions,
                "p50_ms": _num(r.p50_ms),
                "p99_ms": _num(r.p99_ms),
                "max_ms": _num(r.max_ms),
                "mean_ms": _num(r.mean_ms),
                "cpu_p50_ms": _num(r.cpu_p50_ms),
                "cpu_p99_ms": _num(r.cpu_p99_ms),
            }
            for r in rows
        ],
        "goals": {f"in_process_p99_lt_{GOAL_P99_MS:g}ms_at_{GOAL_CANDIDATES}": goal_met(rows)},
        "skipped": dict(skipped),
    }
    return json.dumps(line, separators=(",", ":"))

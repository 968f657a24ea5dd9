"""The routing simulator's report: a JSON-ready dict, a plain-text table, and PNG plots.

Formatting only. The JSON holds nothing that depends on the machine (no wall time), so the same
settings and seed give a byte-identical file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from infermesh.dev.sim.route.metrics import StrategyMetrics
from infermesh.dev.sim.route.runner import RouteSimSettings, SweepPoint

__all__ = [
    "format_table",
    "goals",
    "plot_cdf",
    "plot_sweep",
    "report_dict",
    "write_json",
]

_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    # header, field, scale, format
    ("TTFT p50 ms", "ttft_p50_s", 1000, ".0f"),
    ("p95", "ttft_p95_s", 1000, ".0f"),
    ("p99", "ttft_p99_s", 1000, ".0f"),
    ("ITL p50 ms", "itl_p50_s", 1000, ".1f"),
    ("e2e p50 s", "e2e_p50_s", 1, ".2f"),
    ("e2e p95 s", "e2e_p95_s", 1, ".2f"),
    ("out tok/s", "output_tokens_per_s", 1, ".0f"),
    ("tok/s arr", "window_tokens_per_s", 1, ".0f"),
    ("goodput", "goodput", 100, ".1f"),
    ("prefix hit %", "prefix_hit_rate", 100, ".1f"),
    ("GPU-s/1k tok", "gpu_s_per_1k_tokens", 1, ".2f"),
    ("hedge %", "hedge_extra_load", 100, ".1f"),
    ("hedge tok %", "hedge_extra_tokens", 100, ".1f"),
    ("done/rej/open", "", 1, ""),
)


def _cell(metrics: StrategyMetrics, field: str, scale: float, fmt: str) -> str:
    if not field:
        return f"{metrics.completed}/{metrics.rejected}/{metrics.in_flight}"
    value = getattr(metrics, field)
    return "-" if value is None else format(value * scale, fmt)


def format_table(metrics: Sequence[StrategyMetrics]) -> str:
    """One row per strategy, aligned in plain text."""
    header = ["strategy", *(c[0] for c in _COLUMNS)]
    rows = [[m.strategy, *(_cell(m, f, s, fmt) for _, f, s, fmt in _COLUMNS)] for m in metrics]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.rjust(w) for cell, w in zip(header, widths, strict=True))
    return "\n".join([head, *lines])


def goals(metrics: Sequence[StrategyMetrics]) -> dict[str, Any]:
    """The issue's goals for `infermesh` against round robin and the best other strategy."""
    by_name = {m.strategy: m for m in metrics}
    ours = by_name.get("infermesh")
    if ours is None or ours.ttft_p95_s is None:
        return {}
    out: dict[str, Any] = {}
    rr = by_name.get("round_robin")
    if rr is not None and rr.ttft_p95_s:
        out["p95_ttft_vs_round_robin"] = round(ours.ttft_p95_s / rr.ttft_p95_s, 4)
    peers = [m for m in metrics if m.strategy != "infermesh" and m.ttft_p95_s]
    if peers:
        best = min(peers, key=lambda m: m.ttft_p95_s or 0.0)
        assert best.ttft_p95_s is not None
        out["best_peer_p95_ttft"] = best.strategy
        out["p95_ttft_vs_best_peer"] = round(ours.ttft_p95_s / best.ttft_p95_s, 4)
        top = max(peers, key=lambda m: m.output_tokens_per_s)
        out["best_peer_throughput"] = top.strategy
        out["throughput_vs_best_peer"] = (
            round(ours.output_tokens_per_s / top.output_tokens_per_s, 4)
            if top.output_tokens_per_s
            else None
        )
        window = max(peers, key=lambda m: m.window_tokens_per_s)
        out["best_peer_window_throughput"] = window.strategy
        out["window_throughput_vs_best_peer"] = (
            round(ours.window_tokens_per_s / window.window_tokens_per_s, 4)
            if window.window_tokens_per_s
            else None
        )
    return out


def _settings_dict(settings: RouteSimSettings) -> dict[str, Any]:
    data = attrs.asdict(settings)
    data["trace"] = None if settings.trace is None else str(settings.trace)
    data["strategies"] = list(settings.strategies)
    data["fleet"]["profiles"] = list(settings.fleet.profiles)
    return data


def report_dict(
    settings: RouteSimSettings,
    metrics: Sequence[StrategyMetrics],
    sweep: Sequence[SweepPoint] = (),
    degraded: Sequence[str] = (),
    per_seed: dict[int, list[StrategyMetrics]] | None = None,
) -> dict[str, Any]:
    """The JSON report; with `per_seed`, `strategies` holds the median rows and `seeds` every
    seed's own rows and goals."""
    report: dict[str, Any] = {
        "scenario": "route",
        "settings": _settings_dict(settings),
        "degraded_replicas": list(degraded),
        "strategies": [m.to_json() for m in metrics],
        "goals": goals(metrics),
    }
    if per_seed:
        report["seeds"] = [
            {"seed": seed, "strategies": [m.to_json() for m in rows], "goals": goals(rows)}
            for seed, rows in per_seed.items()
        ]
    if sweep:
        report["sweep"] = [
            {"rate": point.rate, "strategies": [m.to_json() for m in point.metrics]}
            for point in sweep
        ]
    return report


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def plot_cdf(metrics: Sequence[StrategyMetrics], path: Path, title: str) -> None:
    """TTFT CDF per strategy (log x axis). Needs `infermesh-dev[plots]`."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    for m in metrics:
        values = m.ttfts_s
        if not values:
            continue
        ys = [(i + 1) / len(values) for i in range(len(values))]
        axes.plot([v * 1000 for v in values], ys, label=m.strategy, linewidth=1.3)
    axes.set_xscale("log")
    axes.set_xlabel("TTFT (ms)")
    axes.set_ylabel("fraction of requests")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)


def plot_sweep(sweep: Sequence[SweepPoint], path: Path, title: str) -> None:
    """p95 TTFT against offered load, one line per strategy. Needs `infermesh-dev[plots]`."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]

    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=90)
    names = [m.strategy for m in sweep[0].metrics] if sweep else []
    for index, name in enumerate(names):
        xs = [p.rate for p in sweep if p.metrics[index].ttft_p95_s is not None]
        ys = [
            (p.metrics[index].ttft_p95_s or 0.0) * 1000
            for p in sweep
            if p.metrics[index].ttft_p95_s is not None
        ]
        axes.plot(xs, ys, marker="o", label=name, linewidth=1.3)
    axes.set_yscale("log")
    axes.set_xlabel("offered load (requests/s)")
    axes.set_ylabel("p95 TTFT (ms)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, metadata={"Software": None})
    plt.close(figure)

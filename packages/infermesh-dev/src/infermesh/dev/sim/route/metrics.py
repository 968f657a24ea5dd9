"""Per-strategy results of a routing run: latency percentiles, throughput, goodput, cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from infermesh.dev.sim.route.world import RequestRecord, RunResult

__all__ = ["StrategyMetrics", "compute_metrics", "median_metrics", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The `q` (0..1) quantile by linear interpolation; None for no values."""
    if not sorted_values:
        return None
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


@attrs.frozen
class StrategyMetrics:
    """One strategy's figures; latencies in seconds, as the client saw them."""

    strategy: str
    arrived: int
    completed: int
    rejected: int
    in_flight: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p95_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None
    e2e_p99_s: float | None
    output_tokens_per_s: float
    """Output tokens of completed requests over first arrival -> last completion (one slow
    straggler stretches it)."""
    window_tokens_per_s: float
    """Output tokens that reached clients while requests arrived (first arrival -> end of
    arrivals), over that window: the fleet's rate under the offered load."""
    goodput: float
    """Fraction of arrived requests that completed within their SLO class's targets."""
    prefix_hit_rate: float
    gpu_s_per_1k_tokens: float | None
    """Busy GPU-seconds (summed over replicas) per 1,000 output tokens generated."""
    hedge_extra_load: float
    """Extra requests sent as hedges, as a fraction of arrived requests."""
    hedge_extra_tokens: float
    """Output tokens made by hedge-race losers before their cancel, as a fraction of the
    completed requests' output tokens."""
    hedges: int
    preemptions: int
    end_s: float
    rejections: dict[str, int] = attrs.field(factory=dict)
    """Rejected requests by reason (admission: saturated, queue_full, queue_timeout)."""
    hedges_denied: dict[str, int] = attrs.field(factory=dict)
    """Hedges due but not sent, by reason (budget, saturated)."""
    ttfts_s: tuple[float, ...] = attrs.field(default=(), repr=False, eq=False)
    """Every completed request's TTFT, sorted (for the CDF plots; not in the JSON)."""

    @property
    def conserved(self) -> bool:
        return self.arrived == self.completed + self.rejected + self.in_flight

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, filter=lambda a, _: a.name != "ttfts_s")
        data["conserved"] = self.conserved
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in data.items()}


def _met_slo(record: RequestRecord) -> bool:
    ttft, e2e = record.ttft_s, record.e2e_s
    if ttft is None or e2e is None:
        return False
    slo = record.request.slo
    return ttft <= slo.ttft_s and e2e <= slo.ttft_s + slo.e2e_s_per_output_token * (
        record.request.output_tokens
    )


def compute_metrics(name: str, result: RunResult) -> StrategyMetrics:
    records = result.records
    done = [r for r in records if r.finished_s is not None]
    rejected = sum(1 for r in records if r.rejected)
    ttfts = sorted(t for r in done if (t := r.ttft_s) is not None)
    e2es = sorted(t for r in done if (t := r.e2e_s) is not None)
    itls = sorted(
        (r.finished_s - r.first_token_s) / (r.request.output_tokens - 1)
        for r in done
        if r.request.output_tokens > 1 and r.first_token_s is not None and r.finished_s
    )
    output_tokens = sum(r.request.output_tokens for r in done)
    first_arrival = min((r.request.arrival_s for r in records), default=0.0)
    last_finish = max((r.finished_s for r in done if r.finished_s), default=first_arrival)
    span = last_finish - first_arrival
    arrived = len(records)
    rejections: dict[str, int] = {}
    for record in records:
        if record.rejected:
            reason = record.reject_reason or "rejected"
            rejections[reason] = rejections.get(reason, 0) + 1
    return StrategyMetrics(
        strategy=name,
        arrived=arrived,
        completed=len(done),
        rejected=rejected,
        in_flight=arrived - len(done) - rejected,
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p95_s=percentile(ttfts, 0.95),
        ttft_p99_s=percentile(ttfts, 0.99),
        itl_p50_s=percentile(itls, 0.5),
        itl_p95_s=percentile(itls, 0.95),
        e2e_p50_s=percentile(e2es, 0.5),
        e2e_p95_s=percentile(e2es, 0.95),
        e2e_p99_s=percentile(e2es, 0.99),
        output_tokens_per_s=output_tokens / span if span > 0 else 0.0,
        window_tokens_per_s=(
            result.window_output_tokens / result.window_s if result.window_s > 0 else 0.0
        ),
        goodput=sum(1 for r in done if _met_slo(r)) / arrived if arrived else 0.0,
        prefix_hit_rate=(
            result.prefix_hit_tokens / result.prefix_query_tokens
            if result.prefix_query_tokens
            else 0.0
        ),
        gpu_s_per_1k_tokens=result.busy_s / output_tokens * 1000 if output_tokens else None,
        hedge_extra_load=result.hedges / arrived if arrived else 0.0,
        hedge_extra_tokens=result.hedge_wasted_tokens / output_tokens if output_tokens else 0.0,
        hedges=result.hedges,
        preemptions=result.preemptions,
        end_s=result.end_s,
        rejections=dict(sorted(rejections.items())),
        hedges_denied=dict(result.hedges_denied),
        ttfts_s=tuple(ttfts),
    )


_COUNTS = ("arrived", "completed", "rejected", "in_flight", "hedges", "preemptions")


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _sum_counts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for counts in dicts:
        for key, value in counts.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


def median_metrics(rows: Sequence[StrategyMetrics]) -> StrategyMetrics:
    """One strategy's runs over several seeds as one row: the median of every latency, rate and
    ratio (over the seeds that have it), the total of every count (so arrived = completed +
    rejected + in flight still holds), and every seed's TTFTs pooled for the CDF."""
    if not rows:
        raise ValueError("no runs to summarise")
    if len({row.strategy for row in rows}) != 1:
        raise ValueError("the runs summarised must be of one strategy")
    values: dict[str, Any] = {"strategy": rows[0].strategy}
    for field in attrs.fields(StrategyMetrics):
        name = field.name
        if name == "strategy":
            continue
        column = [getattr(row, name) for row in rows]
        if name in _COUNTS:
            values[name] = sum(column)
        elif name in ("rejections", "hedges_denied"):
            values[name] = _sum_counts(column)
        elif name == "ttfts_s":
            values[name] = tuple(sorted(t for row in rows for t in row.ttfts_s))
        else:
            present = [v for v in column if v is not None]
            values[name] = _median(present) if present else None
    return StrategyMetrics(**values)

"""Per-strategy results of a routing run: latency percentiles, throughput, goodput, cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs

from infermesh.dev.sim.route.world import RequestRecord, RunResult

__all__ = ["StrategyMetrics", "compute_metrics", "percentile"]


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
    goodput: float
    """Fraction of arrived requests that completed within their SLO class's targets."""
    prefix_hit_rate: float
    gpu_s_per_1k_tokens: float | None
    """Busy GPU-seconds (summed over replicas) per 1,000 output tokens generated."""
    hedge_extra_load: float
    """Extra requests sent as hedges, as a fraction of arrived requests."""
    preemptions: int
    end_s: float
    ttfts_s: tuple[float, ...] = attrs.field(repr=False, eq=False)
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


def compute_metrics(name: str, result: RunResult, hedges: int = 0) -> StrategyMetrics:
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
        goodput=sum(1 for r in done if _met_slo(r)) / arrived if arrived else 0.0,
        prefix_hit_rate=(
            result.prefix_hit_tokens / result.prefix_query_tokens
            if result.prefix_query_tokens
            else 0.0
        ),
        gpu_s_per_1k_tokens=result.busy_s / output_tokens * 1000 if output_tokens else None,
        hedge_extra_load=hedges / arrived if arrived else 0.0,
        preemptions=result.preemptions,
        end_s=result.end_s,
        ttfts_s=tuple(ttfts),
    )

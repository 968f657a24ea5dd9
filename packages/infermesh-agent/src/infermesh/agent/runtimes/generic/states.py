"""Turn two successive page readings into ModelState values: gauges, rates, interval means.

Sans-I/O and clock-free: the caller passes the readings, the model names, health and `now`.
Units are converted here (µs/ms → s, % → fraction); a field with no series stays absent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from infermesh.agent.runtimes.generic.mapping import MetricMapping, Signal
from infermesh.agent.runtimes.generic.page import Observed, PageReading
from infermesh.core.model import Labels, ModelState, TargetKey, finite_or_none

__all__ = ["build_states"]


def build_states(
    *,
    mapping: MetricMapping,
    node: str,
    endpoint: str,
    models: Sequence[str],
    reading: PageReading,
    previous: PageReading | None,
    health: Mapping[str, tuple[bool, str]],
    fixed_max_num_seqs: int | None,
    now: float,
) -> dict[TargetKey, ModelState]:
    """One ModelState per model; `health` maps each model (or `""` for all) to (ok, reason)."""
    states = {}
    for model in models:
        key = TargetKey(model=model, node=node, endpoint=endpoint)
        series_key = model if mapping.model_label else ""
        current = reading.models.get(series_key, {})
        before = previous.models.get(series_key, {}) if previous is not None else {}
        elapsed_s = reading.taken_at - previous.taken_at if previous is not None else 0.0
        values: dict[str, float | None] = {}
        for field, signal in mapping.signals.items():
            observed = current.get(field)
            if observed is not None:
                values[field] = _value(signal, observed, before.get(field), elapsed_s)
        healthy, reason = health.get(model, health.get("", (True, "")))
        max_seqs = values.get("max_num_seqs")
        states[key] = ModelState(
            key=key,
            labels=Labels(model=model, runtime=mapping.runtime, node=node),
            running=values.get("running") or 0.0,
            waiting=values.get("waiting") or 0.0,
            kv_cache_usage=_fraction(values.get("kv_cache_usage")) or 0.0,
            prefix_cache_hit_rate=_fraction(values.get("prefix_cache_hit_rate")),
            ttft_s=values.get("ttft_s"),
            itl_s=values.get("itl_s"),
            e2e_s=values.get("e2e_s"),
            prompt_tokens_per_s=values.get("prompt_tokens_per_s") or 0.0,
            generation_tokens_per_s=values.get("generation_tokens_per_s") or 0.0,
            max_num_seqs=(
                fixed_max_num_seqs
                if fixed_max_num_seqs is not None
                else int(max_seqs)
                if max_seqs is not None and max_seqs >= 1
                else None
            ),
            healthy=healthy,
            health_reason=reason,
            last_updated=now,
        )
    return states


def _value(
    signal: Signal, current: Observed, before: Observed | None, elapsed_s: float
) -> float | None:
    if signal.type == "gauge":
        return finite_or_none(current.value * signal.factor)
    if signal.type == "counter_rate":
        if before is None or elapsed_s <= 0:
            return 0.0
        return _increase(current.value, before.value) * signal.factor / elapsed_s
    # histogram_mean and counter_ratio: the mean over the last interval when something was
    # observed in it, else the cumulative mean (a quiet runtime keeps its last known latency).
    if before is not None and current.count > before.count:
        new_count = current.count - before.count
        new_value = _increase(current.value, before.value)
        if current.value >= before.value:
            return finite_or_none(new_value / new_count * signal.factor)
    if current.count > 0:
        return finite_or_none(current.value / current.count * signal.factor)
    return None


def _increase(current: float, before: float) -> float:
    # A counter that went down means the runtime restarted: everything counted is new.
    return current - before if current >= before else current


def _fraction(value: float | None) -> float | None:
    return None if value is None else min(1.0, max(0.0, value))

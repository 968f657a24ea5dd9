"""Read a vLLM /metrics page into per-model totals, in every naming era vLLM has used.

Sans-I/O and clock-free: text in, a MetricsReading out, or VllmPageError saying what is wrong.
Knows vLLM's metric names (before and after the 0.12 renames, `vllm:` or `vllm_`); never
computes rates (see parse.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from infermesh.core.prometheus import Histogram, MetricsParseError, Sample, parse_samples

__all__ = ["FAMILIES", "MetricsReading", "ServedModelReading", "VllmPageError", "read_metrics"]

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"  # removed in 0.12
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
PREFIX_QUERIES_OLD = "vllm:gpu_prefix_cache_queries_total"  # removed in 0.12
PREFIX_HITS_OLD = "vllm:gpu_prefix_cache_hits_total"  # removed in 0.12
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
TTFT = "vllm:time_to_first_token_seconds"
ITL = "vllm:inter_token_latency_seconds"
ITL_OLD = "vllm:time_per_output_token_seconds"  # renamed in 0.11, removed in 0.15
E2E = "vllm:e2e_request_latency_seconds"
SLEEP_STATE = "vllm:engine_sleep_state"
LORA_INFO = "vllm:lora_requests_info"
CACHE_CONFIG = "vllm:cache_config_info"

_HISTOGRAMS = (TTFT, ITL, ITL_OLD, E2E)
# Only `_sum` and `_count` of the latency histograms are read: means need nothing else, and
# skipping the `_bucket` lines is most of the parsing work on a vLLM page.
FAMILIES: frozenset[str] = frozenset(
    {RUNNING, WAITING, KV_USAGE, KV_USAGE_OLD, PREFIX_QUERIES, PREFIX_HITS, PREFIX_QUERIES_OLD}
    | {PREFIX_HITS_OLD, PROMPT_TOKENS, GENERATION_TOKENS, SLEEP_STATE, LORA_INFO, CACHE_CONFIG}
    | {name + suffix for name in _HISTOGRAMS for suffix in ("_sum", "_count")}
)


class VllmPageError(ValueError):
    """A vLLM endpoint answered with something this adapter cannot read; the message says why.

    `path` is the endpoint whose answer was bad (`/metrics` or `/v1/models`).
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@attrs.frozen
class ServedModelReading:
    """The series of one `model_name`, summed over engines (KV usage: the fullest engine)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    ttft: Histogram | None = None
    itl: Histogram | None = None
    e2e: Histogram | None = None

    def merge(self, other: ServedModelReading) -> ServedModelReading:
        """Two served names' readings combined (used when /v1/models names an alias)."""

        def add(a: float | None, b: float | None) -> float | None:
            return b if a is None else a if b is None else a + b

        def add_h(a: Histogram | None, b: Histogram | None) -> Histogram | None:
            return b if a is None else a if b is None else a + b

        return ServedModelReading(
            running=self.running + other.running,
            waiting=self.waiting + other.waiting,
            kv_cache_usage=max(self.kv_cache_usage, other.kv_cache_usage),
            prefix_queries=add(self.prefix_queries, other.prefix_queries),
            prefix_hits=add(self.prefix_hits, other.prefix_hits),
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            generation_tokens=self.generation_tokens + other.generation_tokens,
            ttft=add_h(self.ttft, other.ttft),
            itl=add_h(self.itl, other.itl),
            e2e=add_h(self.e2e, other.e2e),
        )


@attrs.frozen
class MetricsReading:
    """Everything read from one /metrics page, taken at `taken_at` (Unix seconds)."""

    taken_at: float
    served: Mapping[str, ServedModelReading]
    """Per `model_name` label value."""
    asleep: bool = False
    max_num_seqs: int | None = None
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    max_lora: int | None = None


# --------------------------------------------------------------------------- /metrics


def read_metrics(text: str, now: float) -> MetricsReading:
    """Read a /metrics page. Raises VllmPageError for a malformed or non-vLLM page."""
    try:
        found = parse_samples(text, FAMILIES)
    except MetricsParseError as exc:
        raise VllmPageError(f"malformed metrics page, {exc}", "/metrics") from None
    if not found[RUNNING]:
        raise VllmPageError(
            f"no {RUNNING} series on the metrics page; is this URL a vLLM OpenAI server?",
            "/metrics",
        )
    by_model: dict[str, dict[str, list[Sample]]] = {}
    for family, samples in found.items():
        for sample in samples:
            model = sample.labels.get("model_name")
            if model is not None:
                by_model.setdefault(model, {}).setdefault(family, []).append(sample)
    served = {model: _served_reading(series) for model, series in by_model.items()}
    lora = _latest_lora_info(found[LORA_INFO])
    return MetricsReading(
        taken_at=now,
        served=served,
        asleep=_asleep(found[SLEEP_STATE]),
        max_num_seqs=_max_num_seqs(found[CACHE_CONFIG]),
        running_adapters=_split_names(lora.get("running_lora_adapters", "")),
        waiting_adapters=_split_names(lora.get("waiting_lora_adapters", "")),
        max_lora=_int_or_none(lora.get("max_lora")),
    )


def _served_reading(series: Mapping[str, list[Sample]]) -> ServedModelReading:
    def total(family: str) -> float | None:
        values = [s.value for s in series.get(family, ()) if math.isfinite(s.value)]
        return sum(values) if values else None

    def newest_of(new: str, old: str) -> float | None:
        found = total(new)
        return found if found is not None else total(old)

    def histogram(name: str) -> Histogram | None:
        samples = series.get(name + "_sum", []) + series.get(name + "_count", [])
        return Histogram.from_samples(samples) if samples else None

    kv_family = KV_USAGE if series.get(KV_USAGE) else KV_USAGE_OLD
    kv_values = [s.value for s in series.get(kv_family, ()) if math.isfinite(s.value)]
    return ServedModelReading(
        running=total(RUNNING) or 0.0,
        waiting=total(WAITING) or 0.0,
        kv_cache_usage=min(1.0, max(0.0, max(kv_values, default=0.0))),
        prefix_queries=newest_of(PREFIX_QUERIES, PREFIX_QUERIES_OLD),
        prefix_hits=newest_of(PREFIX_HITS, PREFIX_HITS_OLD),
        prompt_tokens=total(PROMPT_TOKENS) or 0.0,
        generation_tokens=total(GENERATION_TOKENS) or 0.0,
        ttft=histogram(TTFT),
        itl=histogram(ITL) or histogram(ITL_OLD),
        e2e=histogram(E2E),
    )


def _asleep(samples: Sequence[Sample]) -> bool:
    """True when every engine reports itself not awake (vLLM sleep mode, 0.12+)."""
    awake = [s.value for s in samples if s.labels.get("sleep_state") == "awake"]
    return bool(awake) and all(value == 0 for value in awake)


def _max_num_seqs(samples: Sequence[Sample]) -> int | None:
    """Sum over engines of the `max_num_seqs` label, when the info gauge carries it."""
    per_engine: dict[str, int] = {}
    for sample in samples:
        value = _int_or_none(sample.labels.get("max_num_seqs"))
        if value is not None:
            per_engine[sample.labels.get("engine", "0")] = value
    return sum(per_engine.values()) if per_engine else None


def _latest_lora_info(samples: Sequence[Sample]) -> Mapping[str, str]:
    # Every running/waiting combination is its own series whose value is the time it was last
    # set, so the current state is the series with the highest value.
    finite = [s for s in samples if math.isfinite(s.value)]
    return max(finite, key=lambda s: s.value).labels if finite else {}


def _split_names(text: str) -> tuple[str, ...]:
    return tuple(sorted({name.strip() for name in text.split(",") if name.strip()}))


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(float(text)) if text not in (None, "", "None") else None
    except ValueError:
        return None

"""Render vLLM /metrics pages of each naming era with prometheus_client, as vLLM itself does.

Used to write the recorded fixtures in `data/` (`uv run python tests/vllm/pages.py`) and to build
pages with chosen values in tests. Metric names, labels and buckets follow
shared/reference/runtime-telemetry.md section 1.2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import attrs
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    generate_latest,
)

Era = Literal["0.8", "0.10", "0.11", "0.13"]

TTFT_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5)
TTFT_BUCKETS += (0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75)
ITL_BUCKETS += (1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS: tuple[float, ...] = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0)
E2E_BUCKETS += (40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@attrs.frozen
class EngineLoad:
    """What one engine core has counted. Observations are dyadic so sums are exact."""

    running: int = 3
    waiting: int = 2
    kv_cache_usage: float = 0.375
    prefix_queries: int = 1024
    prefix_hits: int = 256
    prompt_tokens: int = 12288
    generation_tokens: int = 3456
    ttft_s: Sequence[float] = (0.125, 0.25, 0.0625, 0.5)
    itl_s: Sequence[float] = (0.015625, 0.03125, 0.03125, 0.0234375)
    e2e_s: Sequence[float] = (1.5, 2.25, 0.75, 3.5)
    awake: bool = True


# The totals of these two engines equal the single default engine above.
TWO_ENGINES = (
    EngineLoad(
        running=2,
        waiting=0,
        kv_cache_usage=0.375,
        prefix_queries=512,
        prefix_hits=128,
        prompt_tokens=8192,
        generation_tokens=2048,
        ttft_s=(0.125, 0.25),
        itl_s=(0.015625,),
        e2e_s=(1.5, 2.25),
    ),
    EngineLoad(
        running=1,
        waiting=2,
        kv_cache_usage=0.25,
        prefix_queries=512,
        prefix_hits=128,
        prompt_tokens=4096,
        generation_tokens=1408,
        ttft_s=(0.0625, 0.5),
        itl_s=(0.03125, 0.03125, 0.0234375),
        e2e_s=(0.75, 3.5),
    ),
)


@attrs.frozen
class LoraInfo:
    """`vllm:lora_requests_info` series: (running adapters, waiting adapters, set at Unix time)."""

    max_lora: int
    series: Sequence[tuple[str, str, float]]


def render_page(
    era: Era = "0.13",
    engines: Sequence[EngineLoad] = (EngineLoad(),),
    *,
    model: str = MODEL,
    lora: LoraInfo | None = None,
    underscores: bool = False,
    max_num_seqs: int | None = None,
) -> str:
    """A /metrics page as vLLM of `era` serves it. `underscores` escapes `:` in sample names
    the way prometheus_client >= 0.23 does under OpenMetrics negotiation."""
    registry = CollectorRegistry()
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    labels = ["model_name", "engine"]
    old = era in ("0.8", "0.10")
    new_kv = era != "0.8"

    def gauge(name: str, doc: str, extra: Sequence[str] = ()) -> Gauge:
        return Gauge(name, doc, [*labels, *extra], registry=registry)

    def counter(name: str, doc: str, extra: Sequence[str] = ()) -> Counter:
        return Counter(name, doc, [*labels, *extra], registry=registry)

    def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(name, doc, labels, buckets=buckets, registry=registry)

    running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
    waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
    kv_new = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
    kv_old = gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage.")
    queries_new = counter("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.")
    hits_new = counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of cached tokens.")
    queries_old = counter("vllm:gpu_prefix_cache_queries", "GPU prefix cache queries.")
    hits_old = counter("vllm:gpu_prefix_cache_hits", "GPU prefix cache hits.")
    preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption.")
    prompt = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
    generation = counter("vllm:generation_tokens", "Number of generation tokens processed.")
    success = counter(
        "vllm:request_success", "Count of successfully processed requests.", ["finished_reason"]
    )
    ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
    itl_name = "vllm:time_per_output_token_seconds" if old else "vllm:inter_token_latency_seconds"
    itl = histogram(itl_name, "Inter-token latency.", ITL_BUCKETS)
    tpot_old = None
    if era == "0.11":  # both the new name and the deprecated one are shown
        tpot_old = histogram("vllm:time_per_output_token_seconds", "Deprecated.", ITL_BUCKETS)
    e2e = histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.", E2E_BUCKETS)
    iteration = histogram(
        "vllm:iteration_tokens_total", "Tokens per engine_step.", ITERATION_BUCKETS
    )
    sleep = None
    if era == "0.13":
        sleep = gauge("vllm:engine_sleep_state", "Engine sleep state.", ["sleep_state"])
    cache_labels = ["block_size", "cache_dtype", "enable_prefix_caching"]
    cache_labels += ["gpu_memory_utilization", "num_gpu_blocks", "engine"]
    if max_num_seqs is not None:
        cache_labels.append("max_num_seqs")
    cache_info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        cache_labels,
        registry=registry,
    )

    for index, load in enumerate(engines):
        at = (model, str(index))
        running.labels(*at).set(load.running)
        waiting.labels(*at).set(load.waiting)
        if new_kv:
            kv_new.labels(*at).set(load.kv_cache_usage)
            queries_new.labels(*at).inc(load.prefix_queries)
            hits_new.labels(*at).inc(load.prefix_hits)
        if old:
            kv_old.labels(*at).set(load.kv_cache_usage)
            queries_old.labels(*at).inc(load.prefix_queries)
            hits_old.labels(*at).inc(load.prefix_hits)
        preemptions.labels(*at).inc(0)
        prompt.labels(*at).inc(load.prompt_tokens)
        generation.labels(*at).inc(load.generation_tokens)
        success.labels(*at, "stop").inc(len(load.e2e_s))
        success.labels(*at, "length").inc(0)
        for value in load.ttft_s:
            ttft.labels(*at).observe(value)
        for value in load.itl_s:
            itl.labels(*at).observe(value)
            if tpot_old is not None:
                tpot_old.labels(*at).observe(value)
        for value in load.e2e_s:
            e2e.labels(*at).observe(value)
        iteration.labels(*at).observe(load.running)
        if sleep is not None:
            sleep.labels(*at, "awake").set(1 if load.awake else 0)
            sleep.labels(*at, "weights_offloaded").set(0 if load.awake else 1)
            sleep.labels(*at, "discard_all").set(0)
        cache_values = ["16", "auto", "True", "0.9", "27000", str(index)]
        if max_num_seqs is not None:
            cache_values.append(str(max_num_seqs))
        cache_info.labels(*cache_values).set(1)
    if lora is not None:
        info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=registry,
        )
        for running_names, waiting_names, at_s in lora.series:
            info.labels(str(lora.max_lora), waiting_names, running_names).set(at_s)
    http = Counter(
        "http_requests",
        "Total number of requests by method, status and handler.",
        ["handler", "method", "status"],
        registry=registry,
    )
    http.labels("/v1/chat/completions", "POST", "2xx").inc(len(engines) * 4)
    text = generate_latest(registry).decode()
    return _escape_names(text) if underscores else text


def _escape_names(text: str) -> str:
    # HELP/TYPE keep `vllm:`; sample lines become `vllm_` (prometheus_client issue #1177).
    lines = [
        line if line.startswith("#") else line.replace("vllm:", "vllm_", 1)
        for line in text.split("\n")
    ]
    return "\n".join(lines)


def models_json(model: str = MODEL, adapters: Sequence[str] = ()) -> str:
    """A /v1/models body: the base model card, then one card per LoRA adapter."""
    card = {
        "object": "model",
        "created": 1767225600,
        "owned_by": "vllm",
        "max_model_len": 131072,
        "permission": [{"id": "modelperm-0", "object": "model_permission", "allow_sampling": True}],
    }
    data = [{**card, "id": model, "root": model, "parent": None}]
    for name in adapters:
        data.append({**card, "id": name, "root": f"/adapters/{name}", "parent": model})
    return json.dumps({"object": "list", "data": data}, indent=1)


LORA_ADAPTERS = ("sql-lora", "chat-lora", "summarise-lora")
LORA = LoraInfo(
    max_lora=4,
    series=(
        ("", "", 1767225600.0),
        ("sql-lora", "chat-lora", 1767225660.5),
        ("sql-lora,chat-lora", "", 1767225720.25),
        ("chat-lora", "", 1767225690.0),
    ),
)


def write_fixtures(folder: Path) -> None:
    pages = {
        "vllm-0.8-old-names.prom": render_page("0.8"),
        "vllm-0.10-both-names.prom": render_page("0.10"),
        "vllm-0.11-itl-renamed.prom": render_page("0.11"),
        "vllm-0.13.prom": render_page("0.13"),
        "vllm-0.13-underscores.prom": render_page("0.13", underscores=True),
        "vllm-0.13-two-engines.prom": render_page("0.13", TWO_ENGINES),
        "vllm-0.13-lora.prom": render_page("0.13", lora=LORA),
        "models.json": models_json(),
        "models-lora.json": models_json(adapters=LORA_ADAPTERS),
    }
    for name, text in pages.items():
        (folder / name).write_text(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    write_fixtures(Path(__file__).parent / "data")

"""vLLM's /metrics page for an emulated replica: the post-0.12 names, labels, units and buckets.

Uses prometheus_client with a registry of its own so the exposition is byte-for-byte the format
vLLM serves (counters registered without `_total`, `_created` series, classic text 1.0.0).
Only records what the engine model reports; never reads a clock or touches the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from infermesh.dev.engine import EngineConfig, EngineSnapshot, FinishedStats, StepStats

__all__ = ["CONTENT_TYPE", "FINISH_REASONS", "VllmMetricsPage"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")

# Bucket boundaries as vLLM 0.33 declares them (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
REQUEST_LATENCY_BUCKETS_S = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
PARAMS_N_BUCKETS = (1, 2, 5, 10, 20)


def buckets_1_2_5(max_value: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's build_1_2_5_buckets)."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(float(value))
        exponent += 1


class VllmMetricsPage:
    """Prometheus metrics of one emulated vLLM engine, labelled `model_name` and `engine`."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        *,
        engine_index: str = "0",
        gpu_memory_utilization: float = 0.9,
        max_loras: int = 0,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.engine_index = engine_index
        self.max_loras = max_loras
        labels = ("model_name", "engine")
        values = (model_name, engine_index)
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg)

        self._running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).labels(*values)
        self._waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).labels(*values)
        self._kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(*values)
        sleep_state = Gauge(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is "
            "awake; weights_offloaded = 1 means sleep level 1; "
            "discard_all = 1 means sleep level 2.",
            (*labels, "sleep_state"),
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep_state.labels(*values, state).set(value)
        self._prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ).labels(*values)
        self._prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(*values)
        self._preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        ).labels(*values)
        self._prompt_tokens = counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed."
        ).labels(*values)
        self._generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(*values)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*labels, "finished_reason"),
            registry=reg,
        )
        self._success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}

        max_len = config.max_model_len
        self._req_prompt_tokens = histogram(
            "vllm:request_prompt_tokens",
            "Number of prefill tokens processed.",
            buckets_1_2_5(max_len),
        ).labels(*values)
        self._req_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Number of generation tokens processed.",
            buckets_1_2_5(max_len),
        ).labels(*values)
        self._iteration_tokens = histogram(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ITERATION_TOKENS_BUCKETS,
        ).labels(*values)
        self._req_max_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            buckets_1_2_5(max_len),
        ).labels(*values)
        self._params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", PARAMS_N_BUCKETS
        ).labels(*values)
        self._params_max_tokens = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.",
            buckets_1_2_5(max_len),
        ).labels(*values)
        self._ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        ).labels(*values)
        self._itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS_S,
        ).labels(*values)
        self._tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS_S,
        ).labels(*values)
        self._e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        ).labels(*values)
        self._queue = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        ).labels(*values)
        self._inference = histogram(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        ).labels(*values)
        self._prefill = histogram(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        ).labels(*values)
        self._decode = histogram(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        ).labels(*values)
        self._kv_computed = histogram(
            "vllm:request_prefill_kv_computed_tokens",
            "Histogram of new KV tokens computed during prefill (excluding cached tokens).",
            buckets_1_2_5(max_len),
        ).labels(*values)

        cache_info = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "calculate_kv_scales": "False",
            "cpu_offload_gb": "0",
            "enable_prefix_caching": str(config.enable_prefix_caching),
            "gpu_memory_utilization": str(gpu_memory_utilization),
            "is_attention_free": "False",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(config.num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
            "swap_space": "4",
            "engine": engine_index,
        }
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(cache_info),
            registry=reg,
            multiprocess_mode="mostrecent",
        ).labels(**cache_info).set(1)
        self._lora_info = (
            Gauge(
                "vllm:lora_requests_info",
                "Running stats on lora requests.",
                ("max_lora", "waiting_lora_adapters", "running_lora_adapters"),
                registry=reg,
                multiprocess_mode="sum",
            )
            if max_loras
            else None
        )

    # ------------------------------------------------------------------ recording

    def record_step(self, stats: StepStats) -> None:
        """Add one engine step's counters and latency observations."""
        if stats.scheduled_tokens:
            self._iteration_tokens.observe(stats.scheduled_tokens)
        if stats.prompt_tokens:
            self._prompt_tokens.inc(stats.prompt_tokens)
        if stats.generation_tokens:
            self._generation_tokens.inc(stats.generation_tokens)
        if stats.prefix_queries_tokens:
            self._prefix_queries.inc(stats.prefix_queries_tokens)
        if stats.prefix_hits_tokens:
            self._prefix_hits.inc(stats.prefix_hits_tokens)
        if stats.preemptions:
            self._preemptions.inc(stats.preemptions)
        for ttft_s in stats.ttfts_s:
            self._ttft.observe(ttft_s)
        for itl_s in stats.itls_s:
            self._itl.observe(itl_s)
        for finished in stats.finished:
            self.record_finished(finished)

    def record_finished(self, finished: FinishedStats) -> None:
        """Per-request histograms and the success counter for one finished request."""
        reason = finished.finish_reason if finished.finish_reason in self._success else "error"
        self._success[reason].inc()
        self._e2e.observe(finished.e2e_s)
        self._queue.observe(finished.queue_s)
        self._inference.observe(finished.inference_s)
        self._prefill.observe(finished.prefill_s)
        self._decode.observe(finished.decode_s)
        self._req_prompt_tokens.observe(finished.prompt_tokens)
        self._req_generation_tokens.observe(finished.generation_tokens)
        self._req_max_generation_tokens.observe(finished.max_tokens)
        self._params_max_tokens.observe(finished.max_tokens)
        self._params_n.observe(1)
        self._kv_computed.observe(finished.prefill_computed_tokens)
        if finished.generation_tokens > 1:
            self._tpot.observe(finished.decode_s / (finished.generation_tokens - 1))

    def record_instant(
        self, prompt_tokens: int, completion_tokens: int, finish_reason: str
    ) -> None:
        """Counters for a request answered without the engine model (instant profile)."""
        self._prompt_tokens.inc(prompt_tokens)
        self._generation_tokens.inc(completion_tokens)
        self._success[finish_reason].inc()

    # ------------------------------------------------------------------ exposition

    def render(
        self,
        snapshot: EngineSnapshot,
        *,
        now: float = 0.0,
        running_adapters: Iterable[str] = (),
        waiting_adapters: Iterable[str] = (),
    ) -> bytes:
        """The page: gauges set from `snapshot`, then prometheus_client's text exposition.

        `now` (Unix seconds) is the value of the LoRA info series, as vLLM sets it.
        """
        self._running.set(snapshot.running)
        self._waiting.set(snapshot.waiting)
        self._kv_usage.set(snapshot.kv_cache_usage)
        if self._lora_info is not None:
            self._lora_info.labels(
                str(self.max_loras),
                ",".join(sorted(waiting_adapters)),
                ",".join(sorted(running_adapters)),
            ).set(now)
        return generate_latest(self.registry)

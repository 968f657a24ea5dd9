"""/metrics content: a gauge per tracked target and GPU, read from the store at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from infermesh.agent.metrics import AgentMetrics
from infermesh.core.config import ScoringConfig
from infermesh.core.model import GpuKey, GpuStateDelta, ModelStateDelta, TargetKey
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 100.0
KEY = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8001")


def scrape(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_every_target_and_gpu_has_its_gauges_with_identifying_labels() -> None:
    store, inflight = StateStore(), InflightTracker()
    engine = ScoringEngine.from_config(
        store, inflight, {s.name: s for s in builtin_scorers()}, ScoringConfig()
    )
    metrics = AgentMetrics(store, inflight, engine, clock=lambda: NOW)
    store.apply_model_delta(
        ModelStateDelta(
            KEY, 1, {"running": 3.0, "waiting": 2.0, "kv_cache_usage": 0.25, "last_updated": 99.0}
        )
    )
    store.apply_model_delta(ModelStateDelta(KEY, 1, {"running": 8.0}))  # stale
    store.apply_gpu_delta(
        GpuStateDelta(
            GpuKey("n1", "GPU-0"),
            1,
            {"memory_used_bytes": 10, "memory_total_bytes": 40, "name": "H100"},
        )
    )
    inflight.reserve(KEY.target_id, now=99.5)
    counted = inflight.reserve(KEY.target_id, now=98.0)  # running at the scrape (99.0)
    inflight.release(counted.reservation_id, finished_at=99.8)
    inflight.record_outcome(KEY.target_id, ok=True, status=200, ttft_s=0.1)

    samples = scrape(metrics)
    target = (
        ("endpoint", KEY.endpoint),
        ("model", "llama"),
        ("node", "n1"),
        ("target_id", KEY.target_id),
    )
    assert samples[("infermesh_agent_target_running", target)] == 3.0
    assert samples[("infermesh_agent_target_waiting", target)] == 2.0
    assert samples[("infermesh_agent_target_kv_cache_usage_ratio", target)] == 0.25
    assert samples[("infermesh_agent_target_in_flight", target)] == 1.0
    assert samples[("infermesh_agent_target_finished_unseen", target)] == 1.0
    assert samples[("infermesh_agent_target_healthy", target)] == 1.0
    assert samples[("infermesh_agent_target_telemetry_age_seconds", target)] == 1.0
    assert samples[("infermesh_agent_target_ttft_ewma_seconds", target)] == 0.1
    assert samples[("infermesh_agent_target_work_left_seconds", target)] > 0
    gpu = (("gpu_index", "0"), ("gpu_name", "H100"), ("gpu_uuid", "GPU-0"), ("node", "n1"))
    assert samples[("infermesh_agent_gpu_vram_headroom_ratio", gpu)] == 0.75
    assert samples[("infermesh_agent_gpu_healthy", gpu)] == 1.0
    assert samples[("infermesh_agent_deltas_total", (("kind", "model"), ("result", "stale")))] == 1

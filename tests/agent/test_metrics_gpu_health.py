"""/metrics shows what GPU health does to scoring: each GPU's gpu_health score and throttle
reasons, and which targets a GPU fault keeps from new requests, with the reason."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.agent.metrics import AgentMetrics
from infermesh.core.config import ScoringConfig
from infermesh.core.model import GpuKey, GpuStateDelta, Labels, ModelStateDelta, TargetKey
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 100.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: AgentMetrics) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def gpu_labels(uuid: str, index: int) -> tuple[tuple[str, str], ...]:
    return (("gpu_index", str(index)), ("gpu_name", ""), ("gpu_uuid", uuid), ("node", "n1"))


def target_labels(key: TargetKey, reason: str) -> tuple[tuple[str, str], ...]:
    return (
        ("endpoint", key.endpoint),
        ("model", key.model),
        ("node", key.node),
        ("reason", reason),
        ("target_id", key.target_id),
    )


def test_gpu_health_scores_throttle_reasons_and_gpu_exclusions_are_exported() -> None:
    store, inflight = StateStore(), InflightTracker()
    engine = ScoringEngine.from_config(
        store, inflight, {s.name: s for s in builtin_scorers()}, ScoringConfig()
    )
    metrics = AgentMetrics(store, inflight, engine, clock=lambda: NOW)
    fresh = {"last_updated": NOW - 0.5}
    throttled = {"clock_event_reasons": frozenset({"hw_slowdown"}), "index": 0, **fresh}
    store.apply_gpu_delta(GpuStateDelta(GpuKey("n1", "GPU-0"), 1, throttled))
    store.apply_gpu_delta(GpuStateDelta(GpuKey("n1", "GPU-1"), 1, {"xid_last": 79, "index": 1}))
    on_0 = TargetKey("m", "n1", "http://a")
    on_1 = TargetKey("m", "n1", "http://b")
    unmapped = TargetKey("m", "n1", "http://c")
    store.apply_model_delta(ModelStateDelta(on_0, 1, {"labels": Labels(gpu_uuid="GPU-0")}))
    store.apply_model_delta(ModelStateDelta(on_1, 1, {"labels": Labels(gpu_uuid="GPU-1")}))
    store.apply_model_delta(ModelStateDelta(unmapped, 1, {}))

    samples = scrape(metrics)
    score = "infermesh_agent_gpu_health_score_ratio"
    assert samples[(score, gpu_labels("GPU-0", 0))] == pytest.approx(0.4)
    throttle = (*gpu_labels("GPU-0", 0), ("reason", "hw_slowdown"))
    assert samples[("infermesh_agent_gpu_throttle_reasons", tuple(sorted(throttle)))] == 1.0
    assert samples[("infermesh_agent_gpu_healthy", gpu_labels("GPU-0", 0))] == 1.0
    assert samples[("infermesh_agent_gpu_healthy", gpu_labels("GPU-1", 1))] == 0.0
    excluded = "infermesh_agent_target_gpu_excluded"
    assert samples[(excluded, target_labels(on_0, ""))] == 0.0
    xid = "GPU GPU-1 unhealthy: XID 79 reported"
    assert samples[(excluded, target_labels(on_1, xid))] == 1.0
    assert not any(
        name == excluded and ("endpoint", "http://c") in labels for name, labels in samples
    )

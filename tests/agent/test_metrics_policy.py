"""/metrics shows the operator policy the agent scores with: its revision and drained nodes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from infermesh.agent.metrics import AgentMetrics
from infermesh.core.config import ScoringConfig
from infermesh.core.policy import DrainNode, PolicySet
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore


def policy_gauges(metrics: AgentMetrics) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        if family.name.startswith("infermesh_agent_policy_"):
            (sample,) = family.samples
            found[sample.name] = sample.value
    return found


def test_the_policy_revision_and_drains_follow_the_engine() -> None:
    store, inflight = StateStore(), InflightTracker()
    engine = ScoringEngine.from_config(
        store, inflight, {s.name: s for s in builtin_scorers()}, ScoringConfig()
    )
    metrics = AgentMetrics(store, inflight, engine, clock=lambda: 0.0)
    assert policy_gauges(metrics) == {
        "infermesh_agent_policy_revision": 0.0,
        "infermesh_agent_policy_drained_nodes": 0.0,
    }
    policy = PolicySet().apply(DrainNode("n1", reason="maintenance")).apply(DrainNode("n2"))
    engine.set_policy(policy)
    assert policy_gauges(metrics) == {
        "infermesh_agent_policy_revision": 2.0,
        "infermesh_agent_policy_drained_nodes": 2.0,
    }


def test_without_an_engine_no_policy_is_exported() -> None:
    metrics = AgentMetrics(StateStore(), InflightTracker(), None, clock=lambda: 0.0)
    assert policy_gauges(metrics) == {}

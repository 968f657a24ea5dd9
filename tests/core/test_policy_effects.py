"""Operator policy changes the next scoring decision: drains and pins filter targets out with a
reason, a scoring policy re-weights the scorers for its model and SLO class, and no policy
ranks exactly as before."""

from __future__ import annotations

from infermesh.core.config import ScoringConfig
from infermesh.core.model import ModelStateDelta, RequestFeatures, SloClass, TargetKey
from infermesh.core.policy import (
    DrainNode,
    Pin,
    PolicyKind,
    PolicySet,
    ScoringPolicy,
    SetPolicy,
    UndrainNode,
)
from infermesh.core.scoring.engine import Ranking, ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 1_000_000.0


def engine_with(targets: dict[str, dict[str, float]], model: str = "llama") -> ScoringEngine:
    """One target of `model` per node, with the given telemetry."""
    store = StateStore()
    for i, (node, changes) in enumerate(targets.items()):
        key = TargetKey(model=model, node=node, endpoint=f"http://10.0.0.{i}:8000")
        delta = ModelStateDelta(key=key, version=1, changes={"last_updated": NOW, **changes})
        store.apply_model_delta(delta)
    registered = {s.name: s for s in builtin_scorers()}
    return ScoringEngine.from_config(store, InflightTracker(), registered, ScoringConfig())


def nodes(ranking: Ranking) -> list[str]:
    return [t.target_id.split("|")[0] for t in ranking.targets]


def policy_of(*commands: DrainNode | SetPolicy) -> PolicySet:
    policy = PolicySet()
    for command in commands:
        policy = policy.apply(command)
    return policy


# n1 is idle, n2 has a queue but an empty KV cache, n3 is busy: queue ranks n1 first.
FLEET = {
    "n1": {"waiting": 0.0, "running": 0.0, "kv_cache_usage": 0.9},
    "n2": {"waiting": 4.0, "running": 2.0, "kv_cache_usage": 0.0},
    "n3": {"waiting": 8.0, "running": 4.0, "kv_cache_usage": 0.5},
}


def test_a_drained_node_gets_no_new_requests_and_says_why() -> None:
    engine = engine_with(FLEET)
    engine.set_policy(policy_of(DrainNode("n1", "kernel upgrade", 1.0)))

    ranking = engine.rank(RequestFeatures(model="llama"), NOW)

    assert "n1" not in nodes(ranking)
    assert sorted(nodes(ranking)) == ["n2", "n3"]
    assert [str(e) for e in ranking.excluded] == [
        "n1|http://10.0.0.0:8000|llama: node n1 is drained: kernel upgrade"
    ]


def test_draining_every_node_leaves_no_target_with_the_drain_as_reason() -> None:
    engine = engine_with({"n1": {}, "n2": {}})
    engine.set_policy(policy_of(DrainNode("n1"), DrainNode("n2", "rack move")))

    ranking = engine.rank(RequestFeatures(model="llama"), NOW)

    assert ranking.targets == ()
    assert ranking.model_known
    assert ranking.candidates == 2
    assert [e.why for e in ranking.excluded] == [
        "node n1 is drained",
        "node n2 is drained: rack move",
    ]
    assert not any(e.transient for e in ranking.excluded)
    assert ranking.retry_after_s > 0


def test_a_pinned_model_is_served_only_from_its_pinned_nodes() -> None:
    engine = engine_with(FLEET)
    pin = SetPolicy(PolicyKind.PINS, "llama", Pin(nodes=("n2", "n3")))
    engine.set_policy(policy_of(pin))

    ranking = engine.rank(RequestFeatures(model="llama"), NOW)

    assert nodes(ranking) == ["n2", "n3"]
    assert [e.why for e in ranking.excluded] == ["model llama is pinned to nodes n2, n3"]
    # The same verdict through the single-target check the router uses.
    n1 = engine.store.candidates("llama")[0]
    exclusion = engine.exclusion(n1, RequestFeatures(model="llama"), NOW)
    assert exclusion is not None
    assert exclusion.why == "model llama is pinned to nodes n2, n3"


def test_a_pin_of_another_model_changes_nothing() -> None:
    engine = engine_with(FLEET)
    before = nodes(engine.rank(RequestFeatures(model="llama"), NOW))
    engine.set_policy(policy_of(SetPolicy(PolicyKind.PINS, "mistral", Pin(nodes=("n3",)))))

    assert nodes(engine.rank(RequestFeatures(model="llama"), NOW)) == before


def test_scoring_weights_for_a_model_and_slo_class_change_the_ranking() -> None:
    engine = engine_with(FLEET)
    assert nodes(engine.rank(RequestFeatures(model="llama"), NOW))[0] == "n1"

    kv_only = ScoringPolicy(
        model="llama", slo_class=SloClass.BATCH, weights={"queue": 0.0, "kv": 1.0, "nope": 3.0}
    )
    engine.set_policy(policy_of(SetPolicy(PolicyKind.SCORING, "batch-kv", kv_only)))

    batch = engine.rank(RequestFeatures(model="llama", slo_class=SloClass.BATCH), NOW)
    assert nodes(batch)[0] == "n2"  # the emptiest KV cache wins once the queue does not count
    weights = {r.scorer: r.weight for r in batch.targets[0].reasons}
    assert weights["kv"] == 1.0
    assert "queue" not in weights
    assert "nope" not in weights  # a scorer the engine does not run is ignored
    # Other SLO classes keep the configured weights.
    standard = engine.rank(RequestFeatures(model="llama"), NOW)
    assert nodes(standard)[0] == "n1"


def test_a_scoring_policy_that_zeroes_every_scorer_keeps_the_configured_weights() -> None:
    engine = engine_with(FLEET)
    before = engine.rank(RequestFeatures(model="llama"), NOW)
    zero = {ws.name: 0.0 for ws in engine.scorers}
    engine.set_policy(policy_of(SetPolicy(PolicyKind.SCORING, "off", ScoringPolicy(weights=zero))))

    after = engine.rank(RequestFeatures(model="llama"), NOW)
    assert nodes(after) == nodes(before)
    assert [t.score for t in after.targets] == [t.score for t in before.targets]


def test_scoring_policy_filters_leave_out_overloaded_targets() -> None:
    engine = engine_with(FLEET)
    limits = ScoringPolicy(model="llama", max_waiting=5, max_kv_cache_usage=0.8)
    engine.set_policy(policy_of(SetPolicy(PolicyKind.SCORING, "limits", limits)))

    ranking = engine.rank(RequestFeatures(model="llama"), NOW)

    assert nodes(ranking) == ["n2"]
    assert sorted(e.why for e in ranking.excluded) == [
        "KV cache 90% used > policy max_kv_cache_usage 0.8",
        "waiting 8 > policy max_waiting 5",
    ]


def test_an_empty_policy_ranks_exactly_as_no_policy() -> None:
    engine = engine_with(FLEET)
    request = RequestFeatures(model="llama")
    before = engine.rank(request, NOW)
    engine.set_policy(policy_of(DrainNode("n1")))
    engine.set_policy(PolicySet())

    after = engine.rank(request, NOW)
    assert [(t.target_id, t.score) for t in after.targets] == [
        (t.target_id, t.score) for t in before.targets
    ]
    assert after.excluded == before.excluded == ()
    assert [r.weight for r in after.targets[0].reasons] == [ws.weight for ws in engine.scorers]


def test_undraining_a_node_brings_it_back() -> None:
    engine = engine_with(FLEET)
    drained = policy_of(DrainNode("n1"))
    engine.set_policy(drained)
    assert "n1" not in nodes(engine.rank(RequestFeatures(model="llama"), NOW))

    engine.set_policy(drained.apply(UndrainNode("n1")))
    assert nodes(engine.rank(RequestFeatures(model="llama"), NOW))[0] == "n1"

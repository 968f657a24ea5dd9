"""The net_penalty scorer: nearby replicas win when the other scores are close, and only then."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import TargetView
from infermesh.core.model import ModelState, ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.scoring.engine import RttEstimate, ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import NetPenaltyScorer, builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 1_000.0
REQUEST = RequestFeatures(model="m")


def key(node: str, port: int = 8000) -> TargetKey:
    return TargetKey(model="m", node=node, endpoint=f"http://{node}:{port}")


def view(rtt_s: float | None) -> TargetView:
    return TargetView(state=ModelState(key=key("n")), rtt_s=rtt_s)


def engine(
    rtts: Mapping[str, float] | None,
    loads: Mapping[str, float],
    *,
    estimate: RttEstimate | None = None,
) -> ScoringEngine:
    """An engine over one target per `loads` entry ("node" or "node:port" -> running)."""
    store = StateStore()
    for where, running in loads.items():
        node, _, port = where.partition(":")
        target_key = key(node, int(port or 8000))
        changes = {"running": running, "last_updated": NOW - 0.1, "e2e_s": 1.0}
        store.apply_model_delta(ModelStateDelta(key=target_key, version=1, changes=changes))
    if estimate is None and rtts is not None:
        estimate = rtts.get
    registered = {s.name: s for s in builtin_scorers()}
    return ScoringEngine.from_config(
        store, InflightTracker(), registered, ScoringConfig(), rtt_estimate=estimate
    )


@pytest.mark.parametrize(
    ("rtt_s", "score", "reason"),
    [
        (0.0002, 1.0, "rtt 0.2 ms"),
        (0.001, 1.0, "rtt 1.0 ms"),
        (0.0255, 0.5, "rtt 25.5 ms"),
        (0.05, 0.0, "rtt 50.0 ms"),
        (0.3, 0.0, "rtt 300.0 ms"),
    ],
)
def test_score_falls_linearly_from_one_millisecond_to_the_penalty_rtt(
    rtt_s: float, score: float, reason: str
) -> None:
    (result,) = NetPenaltyScorer().score(REQUEST, [view(rtt_s)])
    assert result.score == pytest.approx(score)
    assert result.reason == reason


@pytest.mark.parametrize("rtt_s", [None, math.nan])
def test_unknown_rtt_is_treated_as_local(rtt_s: float | None) -> None:
    (result,) = NetPenaltyScorer().score(REQUEST, [view(rtt_s)])
    assert result.score == 1.0
    assert result.reason == "rtt unknown: treated as local"


def test_penalty_rtt_is_tunable_and_validated() -> None:
    (result,) = NetPenaltyScorer(penalty_rtt_s=0.201).score(REQUEST, [view(0.101)])
    assert result.score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="penalty_rtt_s"):
        NetPenaltyScorer(penalty_rtt_s=0.0)


def test_is_a_built_in_scorer_with_a_small_default_weight() -> None:
    weights = {s.name: s.default_weight for s in builtin_scorers()}
    assert weights["net_penalty"] == 1.0
    assert weights["net_penalty"] < min(weights["queue"], weights["prefix"])


def test_nearer_replica_wins_when_loads_are_equal() -> None:
    ranking = engine({"near": 0.002, "far": 0.040}, {"near": 1, "far": 1}).rank(REQUEST, NOW)
    assert [t.state.key.node for t in ranking.targets] == ["near", "far"]
    reasons = {
        t.state.key.node: next(r.reason for r in t.reasons if r.scorer == "net_penalty")
        for t in ranking.targets
    }
    assert reasons == {"near": "rtt 2.0 ms", "far": "rtt 40.0 ms"}


def test_a_clearly_less_loaded_far_replica_still_wins() -> None:
    ranking = engine({"near": 0.002, "far": 0.040}, {"near": 6, "far": 0}).rank(REQUEST, NOW)
    assert [t.state.key.node for t in ranking.targets] == ["far", "near"]


def test_without_an_estimator_every_target_is_local_and_load_decides() -> None:
    ranking = engine(None, {"a": 2, "b": 0}).rank(REQUEST, NOW)
    assert [t.state.key.node for t in ranking.targets] == ["b", "a"]
    assert all(t.view.rtt_s is None for t in ranking.targets)


def test_the_estimate_is_asked_once_per_node_per_ranking() -> None:
    asked: list[str] = []

    def estimate(node: str) -> float | None:
        asked.append(node)
        return {"x": 0.01}.get(node)

    loads = {"x:8000": 0, "x:8001": 0, "y:8000": 0}
    ranking = engine(None, loads, estimate=estimate).rank(REQUEST, NOW)

    assert sorted(asked) == ["x", "y"]
    rtts = {t.target_id: t.view.rtt_s for t in ranking.targets}
    assert rtts == {
        key("x").target_id: 0.01,
        key("x", 8001).target_id: 0.01,
        key("y").target_id: None,
    }


def test_a_failing_estimate_counts_as_unknown() -> None:
    def estimate(node: str) -> float | None:
        raise RuntimeError("no map yet")

    scoring = engine(None, {"a": 0, "b": 0}, estimate=estimate)
    ranking = scoring.rank(REQUEST, NOW)
    assert [t.view.rtt_s for t in ranking.targets] == [None, None]
    assert scoring.rtt_estimate_failures == 2
    assert scoring.view(ranking.targets[0].state, NOW).rtt_s is None

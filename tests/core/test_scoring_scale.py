"""Scoring at fleet scale: the store's lazy candidate lists, bounded candidate sets above
`scoring.max_candidates`, and prefix capacity scaled by a replica's measured speed."""

from __future__ import annotations

import random
from typing import Any

import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import ModelState, ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.policy import DrainNode, PolicySet
from infermesh.core.scoring.engine import Ranking, ScoringEngine, ScoringSetupError
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import PrefixAffinityScorer, builtin_scorers
from infermesh.core.scoring.state import StateStore

MODEL = "llama"
NOW = 100.0


def key(i: int, model: str = MODEL) -> TargetKey:
    return TargetKey(model=model, node=f"n{i:05d}", endpoint=f"http://n{i:05d}:8000")


def put(store: StateStore, i: int, version: int = 1, **fields: Any) -> None:
    fields.setdefault("last_updated", NOW)
    store.apply_model_delta(ModelStateDelta(key(i), version, fields))


def engine(store: StateStore, **scoring: Any) -> ScoringEngine:
    registered = {s.name: s for s in builtin_scorers()}
    return ScoringEngine.from_config(store, InflightTracker(), registered, ScoringConfig(**scoring))


def summary(ranking: Ranking) -> list[tuple[str, float, tuple[tuple[float, str], ...]]]:
    return [
        (t.target_id, t.score, tuple((r.score, r.reason) for r in t.results))
        for t in ranking.targets
    ]


# ---------------------------------------------------------------- the store


def test_candidates_stay_ordered_by_key_through_adds_updates_and_adapter_changes() -> None:
    store = StateStore()
    for i in (5, 1, 3):
        put(store, i, running=float(i))
    first = store.candidates(MODEL)
    assert [s.key for s in first] == [key(1), key(3), key(5)]
    assert store.candidates(MODEL) is first  # no write: the same tuple
    keys = store.candidate_keys(MODEL)
    put(store, 3, version=2, running=9.0)  # a value change keeps the key order
    second = store.candidates(MODEL)
    assert second is not first
    assert [s.running for s in second] == [1.0, 9.0, 5.0]
    assert store.candidate_keys(MODEL) is keys
    put(store, 2, running=2.0)  # membership change: re-sorted
    assert [s.key for s in store.candidates(MODEL)] == [key(1), key(2), key(3), key(5)]
    # a target of another model joins `MODEL` through an adapter, then leaves it
    other = TargetKey(model="base", node="n00004", endpoint="http://n00004:8000")
    store.apply_model_delta(ModelStateDelta(other, 1, {"adapters": (MODEL,)}))
    assert [s.key for s in store.candidates(MODEL)][3] == other
    store.apply_model_delta(ModelStateDelta(other, 2, {"adapters": ()}))
    assert other not in [s.key for s in store.candidates(MODEL)]
    assert store.model_known("base")
    assert store.model_names() == ("base", MODEL)


# ---------------------------------------------------------------- small fleets


def small_fleet() -> StateStore:
    store = StateStore()
    rng = random.Random(7)
    for i in range(20):
        put(store, i, running=float(rng.randrange(6)), waiting=float(rng.randrange(3)))
    return store


@pytest.mark.parametrize("prefix_key", [0, 0xABCDEF])
def test_below_the_cap_the_ranking_is_the_same_as_without_one(prefix_key: int) -> None:
    store = small_fleet()
    request = RequestFeatures(model=MODEL, prefix_key=prefix_key)
    uncapped = engine(store, max_candidates=0).rank(request, NOW)
    capped = engine(store, max_candidates=20).rank(request, NOW)
    assert summary(capped) == summary(uncapped)
    assert len(capped.targets) == 20


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ScoringSetupError, match="max_candidates"):
        engine(StateStore(), max_candidates=-1)


# ---------------------------------------------------------------- 10,000 replicas

FLEET = 10_000
PREFIX = 0x1234_5678_9ABC_DEF0


@pytest.fixture(scope="module")
def fleet() -> StateStore:
    store = StateStore()
    rng = random.Random(11)
    for i in range(FLEET):
        # loads 1..3: below the prefix minimum capacity (4), so the prefix never spills
        put(store, i, running=float(1 + rng.randrange(3)))
    put(store, 4321, version=2, running=0.0, waiting=0.0)  # the one idle replica
    return store


def prefix_results(ranking: Ranking) -> dict[str, ScoreResult]:
    return {
        t.target_id: r
        for t in ranking.targets
        for ws, r in zip(t.scorers, t.results, strict=True)
        if ws.name == "prefix"
    }


def test_a_big_fleet_scores_a_bounded_set_and_a_new_prefix_goes_to_the_least_loaded(
    fleet: StateStore,
) -> None:
    ranking = engine(fleet).rank(RequestFeatures(model=MODEL, prefix_key=PREFIX), NOW)
    ids = [t.target_id for t in ranking.targets]
    assert len(ids) == ScoringConfig().max_candidates == 64
    assert ranking.candidates == FLEET
    # never sent anywhere: prefix is neutral, so the queue sends it to the idle replica
    assert ids[0] == key(4321).target_id
    assert {r.score for r in prefix_results(ranking).values()} == {0.5}


def test_the_prefix_home_is_always_scored_and_kept_however_big_the_fleet(
    fleet: StateStore,
) -> None:
    # The sampler's owners are the prefix scorer's homes: a home that is neither least loaded
    # nor likely to be sampled (1 in 10,000) is scored and chosen on every decision.
    e = engine(fleet, max_candidates=32)
    request = RequestFeatures(model=MODEL, prefix_key=PREFIX)
    home = key(77).target_id
    for ws in e.scorers:
        if ws.name == "prefix":
            assert isinstance(ws.scorer, PrefixAffinityScorer)
            ws.scorer.learn(request, home, NOW)
    for _ in range(5):
        ranking = e.rank(request, NOW)
        assert ranking.targets[0].target_id == home
        scores = prefix_results(ranking)
        assert scores[home].score == 1.0
        assert [tid for tid, r in scores.items() if r.score > 0] == [home]


def test_drained_and_unhealthy_targets_are_never_returned() -> None:
    store = StateStore()
    for i in range(500):
        put(store, i, running=5.0)
    # idle but unusable: the least-loaded pick and the prefix owners must skip them
    bad = list(range(0, 500, 3))
    for i in bad:
        put(store, i, version=2, running=0.0, healthy=i % 2 == 0)
    e = engine(store, max_candidates=16)
    policy = PolicySet()
    for i in bad:
        if i % 2 == 0:
            policy = policy.apply(DrainNode(key(i).node, reason="test"))
    e.set_policy(policy)
    bad_ids = {key(i).target_id for i in bad}
    for prefix_key in range(1, 40):
        ranking = e.rank(RequestFeatures(model=MODEL, prefix_key=prefix_key * 0x9E3779B9), NOW)
        assert ranking.targets
        assert len(ranking.targets) <= 16
        assert not bad_ids & {t.target_id for t in ranking.targets}


def test_when_no_sampled_target_is_usable_every_candidate_is_checked() -> None:
    store = StateStore()
    for i in range(200):
        put(store, i, healthy=i == 137)
    ranking = engine(store, max_candidates=8).rank(RequestFeatures(model=MODEL), NOW)
    assert [t.target_id for t in ranking.targets] == [key(137).target_id]


# ---------------------------------------------------------------- speed-aware prefix capacity


def speed_views(slow_itl_s: float, slow_load: float) -> list[TargetView]:
    views = [TargetView(ModelState(key=key(i), itl_s=0.01)) for i in range(1, 4)]
    slow = ModelState(key=key(0), itl_s=slow_itl_s, running=slow_load)
    return [TargetView(slow), *views]


def prefix_scores(views: list[TargetView], prefix_key: int) -> list[ScoreResult]:
    """The prefix scores of `views` after a request with `prefix_key` went to views[0]."""
    scorer = PrefixAffinityScorer()
    request = RequestFeatures(model=MODEL, prefix_key=prefix_key)
    scorer.learn(request, views[0].key.target_id, views[0].now)
    return scorer.score(request, views)


def test_a_replica_at_a_quarter_speed_keeps_a_quarter_of_the_prefix_capacity() -> None:
    results = prefix_scores(speed_views(0.04, slow_load=1.0), PREFIX)
    # capacity 4 (minimum) scaled to 0.25: 1, so a load of 1 spills the prefix
    assert results[0].score == 0.0
    assert "capacity 1 (scaled to its 0.25x median decode speed)" in results[0].reason
    # at full speed the same load keeps it
    assert prefix_scores(speed_views(0.01, slow_load=1.0), PREFIX)[0].score == 1.0


def test_an_idle_slow_replica_still_keeps_its_prefix() -> None:
    assert prefix_scores(speed_views(0.04, slow_load=0.0), PREFIX)[0].score == 1.0


def test_a_replica_that_becomes_idle_is_among_the_least_loaded_after_a_refresh() -> None:
    store = StateStore()
    for i in range(1000):
        put(store, i, running=6.0)
    e = engine(store)
    request = RequestFeatures(model=MODEL)
    e.rank(request, NOW)
    put(store, 777, version=2, running=0.0, last_updated=NOW + 1.5)
    ranking = e.rank(request, NOW + 2.0)  # the least-loaded set is recomputed once a second
    assert ranking.targets[0].target_id == key(777).target_id


def test_the_same_seed_and_decisions_score_the_same_targets(fleet: StateStore) -> None:
    first, second = engine(fleet), engine(fleet)
    for prefix_key in (0, 1, PREFIX):
        request = RequestFeatures(model=MODEL, prefix_key=prefix_key)
        assert summary(first.rank(request, NOW)) == summary(second.rank(request, NOW))

"""Prefix affinity: a minimum capacity under the bounded-load rule, and reasons that say why."""

from __future__ import annotations

import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import ModelState, RequestFeatures, TargetKey
from infermesh.core.scoring.engine import ScoringSetupError, resolve_scorers
from infermesh.core.scoring.scorers import PrefixAffinityScorer, builtin_scorers, hrw_weight

PREFIX = 0x5EED
NAMES = ("a", "b", "c")


def key(name: str) -> TargetKey:
    return TargetKey(model="llama", node=name, endpoint=f"http://{name}:8000")


ORDER = sorted(NAMES, key=lambda n: hrw_weight(PREFIX, key(n).target_id), reverse=True)
"""The rendezvous order of the replicas for PREFIX: ORDER[0] is the prefix's home."""


def score(scorer: PrefixAffinityScorer, **loads: float) -> dict[str, ScoreResult]:
    views = [TargetView(ModelState(key=key(n), running=loads.get(n, 0.0))) for n in NAMES]
    results = scorer.score(RequestFeatures(model="llama", prefix_key=PREFIX), views)
    return dict(zip(NAMES, results, strict=True))


def chosen(results: dict[str, ScoreResult]) -> str:
    (name,) = [n for n, r in results.items() if r.score == 1.0]
    return name


@pytest.mark.parametrize("home_load", [0, 1, 2, 3])
def test_the_home_keeps_its_prefix_below_the_minimum_capacity_while_others_idle(
    home_load: int,
) -> None:
    results = score(PrefixAffinityScorer(), **{ORDER[0]: home_load})
    assert chosen(results) == ORDER[0]
    assert "capacity 4 (minimum; bounded-load" in results[ORDER[0]].reason
    assert "not chosen: rank 1 has room (load 0, capacity 4" in results[ORDER[1]].reason


def test_at_the_minimum_capacity_the_prefix_spills_to_the_next_replica() -> None:
    results = score(PrefixAffinityScorer(), **{ORDER[0]: 4})
    assert chosen(results) == ORDER[1]
    assert results[ORDER[0]].reason.endswith(
        "loaded (load 4 >= capacity 4 (minimum; bounded-load 3))"
    )
    assert "spilled past 1 loaded replica(s)" in results[ORDER[1]].reason


def test_above_the_minimum_the_bounded_load_rule_decides() -> None:
    busy = {ORDER[1]: 10.0, ORDER[2]: 10.0}
    # total 33: capacity ceil(1.25 * 34 / 3) = 15
    kept = score(PrefixAffinityScorer(), **busy, **{ORDER[0]: 13})
    assert chosen(kept) == ORDER[0]
    assert "load 13 < capacity 15 (bounded-load)" in kept[ORDER[0]].reason
    # total 40: capacity ceil(1.25 * 41 / 3) = 18
    spilled = score(PrefixAffinityScorer(), **busy, **{ORDER[0]: 20})
    assert chosen(spilled) == ORDER[1]
    assert "loaded (load 20 >= capacity 18 (bounded-load))" in spilled[ORDER[0]].reason


def test_a_minimum_of_zero_is_the_pure_bounded_load_rule() -> None:
    scorer = PrefixAffinityScorer(min_capacity=0)
    # one request on the home, the others idle: capacity ceil(1.25 * 2 / 3) = 1
    results = score(scorer, **{ORDER[0]: 1})
    assert chosen(results) == ORDER[1]
    assert "capacity 1 (bounded-load)" in results[ORDER[0]].reason


def test_the_minimum_capacity_comes_from_scoring_config() -> None:
    registered = {s.name: s for s in builtin_scorers()}
    (prefix,) = [
        ws.scorer
        for ws in resolve_scorers(registered, ScoringConfig(prefix_min_capacity=16))
        if ws.name == "prefix"
    ]
    assert isinstance(prefix, PrefixAffinityScorer)
    assert prefix.min_capacity == 16
    assert ScoringConfig().prefix_min_capacity == 4


def test_a_negative_minimum_capacity_is_a_clear_startup_error() -> None:
    registered = {s.name: s for s in builtin_scorers()}
    with pytest.raises(
        ScoringSetupError, match=r"scoring\.prefix_min_capacity must be >= 0, got -1"
    ):
        resolve_scorers(registered, ScoringConfig(prefix_min_capacity=-1))

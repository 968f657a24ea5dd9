"""Deferred score reasons: formatted only when read, with the same text as eager ones."""

from __future__ import annotations

import pickle

import attrs
import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult
from infermesh.core.model import ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 1_000_000.0
PREFIX = 0x1234ABCD5678


def engine_with(count: int) -> ScoringEngine:
    store, inflight = StateStore(), InflightTracker(id_prefix="t")
    for i in range(count):
        key = TargetKey(model="llama", node=f"n{i}", endpoint=f"http://10.0.0.{i}:8000")
        changes = {
            "running": float(i % 5),
            "waiting": float(i % 3),
            "kv_cache_usage": 0.1 * (i % 9),
            "last_updated": NOW - 0.3,
            "e2e_s": 1.5,
        }
        store.apply_model_delta(ModelStateDelta(key=key, version=1, changes=changes))
        for _ in range(i % 3):
            inflight.reserve(key.target_id, NOW - 0.1)
    registered = {s.name: s for s in builtin_scorers()}
    return ScoringEngine.from_config(store, inflight, registered, ScoringConfig())


def test_ranked_reasons_read_as_the_eagerly_formatted_text() -> None:
    engine = engine_with(2)
    request = RequestFeatures(model="llama", prefix_key=PREFIX)
    engine.rank(request, NOW)  # the first request with PREFIX goes to n0, the idle one
    ranking = engine.rank(request, NOW)
    reasons = {
        t.target_id.split("|")[0]: {r.scorer: r.reason for r in t.reasons} for t in ranking.targets
    }
    prefix = "prefix 00001234abcd5678"
    assert reasons == {
        "n1": {
            "kv": "KV cache 10% used",
            "prefix": f"{prefix} (~64 tokens) was sent to other replicas recently",
            "queue": "work left 3750ms (running 1, waiting 1, in-flight 1); mean 1875ms",
            "net_penalty": "rtt unknown: treated as local",
            "gpu_health": "no GPU telemetry",
        },
        "n0": {
            "kv": "KV cache 0% used",
            "prefix": f"{prefix}: first ~64 tokens sent here recently, "
            "load 0 < capacity 4 (minimum; bounded-load 3)",
            "queue": "work left 0ms (running 0, waiting 0, in-flight 0); mean 1875ms",
            "net_penalty": "rtt unknown: treated as local",
            "gpu_health": "no GPU telemetry",
        },
    }


def test_a_deferred_reason_is_formatted_once_on_first_read() -> None:
    calls: list[tuple[int, str]] = []

    def explain(count: int, what: str) -> str:
        calls.append((count, what))
        return f"{count} {what}"

    result = ScoreResult.deferred(0.25, explain, 3, "queued")
    assert calls == []
    assert result.score == 0.25
    assert result.reason == "3 queued"
    assert result.reason == "3 queued"
    assert calls == [(3, "queued")]


def test_deferred_and_eager_results_are_the_same_value() -> None:
    eager = ScoreResult(0.5, "half")
    deferred = ScoreResult.deferred(0.5, str.strip, " half ")
    assert eager == deferred
    assert hash(eager) == hash(deferred)
    assert repr(deferred) == "ScoreResult(score=0.5, reason='half')"
    assert pickle.loads(pickle.dumps(deferred)) == eager
    assert ScoreResult(score=0.5, reason="half") != ScoreResult(0.5, "other")
    match deferred:
        case ScoreResult(score, reason):
            assert (score, reason) == (0.5, "half")


def test_a_result_is_immutable() -> None:
    result = ScoreResult(1.0, "best")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        result.score = 0.0


@pytest.mark.parametrize("score", [-0.1, 1.5, float("nan")])
def test_a_score_outside_zero_to_one_is_refused_with_its_reason(score: float) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 1\] \(why\)"):
        ScoreResult(score, "why")
    with pytest.raises(ValueError, match=r"outside \[0, 1\] \(why\)"):
        ScoreResult.deferred(score, str, "why")

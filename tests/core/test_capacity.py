"""Capacity by measured throughput: work left counts in seconds of each target's own speed, so
a GPU that decodes twice as fast gets about twice the work."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import TargetView
from infermesh.core.model import ModelState, ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.scoring.capacity import decode_rate, service_s, tokens_per_request
from infermesh.core.scoring.engine import ScoringEngine, resolve_scorers
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import QueueScorer
from infermesh.core.scoring.state import StateStore

NOW = 1_000_000.0
REQUEST = RequestFeatures(model="m")


def state(name: str = "a", **fields: Any) -> ModelState:
    return ModelState(key=TargetKey("m", "n1", f"http://{name}"), **fields)


# A fast and a slow GPU serving the same requests: 100 tokens each after a 0.1 s first token.
FAST = {"itl_s": 0.01, "ttft_s": 0.1, "e2e_s": 1.1}
SLOW = {"itl_s": 0.02, "ttft_s": 0.1, "e2e_s": 2.1}


def test_decode_rate_comes_from_itl_else_from_the_generation_rate() -> None:
    speed = decode_rate(state(itl_s=0.02, generation_tokens_per_s=999.0, running=1.0))
    assert speed is not None
    assert (speed.tokens_per_s, speed.source) == (50.0, "itl")
    speed = decode_rate(state(generation_tokens_per_s=400.0, running=8.0))
    assert speed is not None
    assert (speed.tokens_per_s, speed.source) == (50.0, "generation rate")
    assert decode_rate(state(generation_tokens_per_s=400.0, running=0.0)) is None
    assert decode_rate(state()) is None


def test_tokens_per_request_is_the_median_decode_length_else_the_requests_max_tokens() -> None:
    views = [
        TargetView(state=state("a", **FAST)),
        TargetView(state=state("b", **SLOW)),
        TargetView(state=state("c", itl_s=0.01, ttft_s=0.1, e2e_s=3.1)),
        TargetView(state=state("d")),  # measures nothing: left out
    ]
    assert tokens_per_request(views, REQUEST) == pytest.approx(100.0)
    unmeasured = [TargetView(state=state("d"))]
    assert tokens_per_request(unmeasured, REQUEST) is None
    asked = RequestFeatures(model="m", max_output_tokens=64)
    assert tokens_per_request(unmeasured, asked) == 64.0


def test_service_time_is_the_decode_length_at_the_targets_own_speed() -> None:
    per_request_s, speed = service_s(state("slow", **SLOW), 100.0)
    assert per_request_s == pytest.approx(2.0)
    assert speed is not None
    assert speed.source == "itl"
    # Unmeasured speed, or no decode length: the end-to-end latency as before.
    assert service_s(state(e2e_s=3.0), 100.0) == (3.0, None)
    assert service_s(state("slow", **SLOW), None) == (2.1, None)


def test_at_equal_queues_the_slower_gpu_has_proportionally_more_work_left() -> None:
    fast = state("fast", running=4.0, waiting=4.0, **FAST)
    slow = state("slow", running=4.0, waiting=4.0, **SLOW)
    results = QueueScorer().score(REQUEST, [TargetView(state=fast), TargetView(state=slow)])
    assert results[0].score > results[1].score
    # work = (waiting + running/2) * service / running: 6 * 1.0 / 4 and 6 * 2.0 / 4
    assert "work left 1500ms" in results[0].reason
    assert "work left 3000ms" in results[1].reason
    assert "2000ms per request at its measured 50 tokens/s per sequence (itl" in results[1].reason


def route(store: StateStore, count: int) -> Counter[str]:
    """Route `count` requests one after another (none finishes), as the router does: best
    target first, each choice reserved so the next ranking sees it."""
    inflight = InflightTracker(id_prefix="t")
    queue_only = resolve_scorers({"queue": QueueScorer()}, ScoringConfig())
    engine = ScoringEngine(store, inflight, queue_only)
    chosen: Counter[str] = Counter()
    for _ in range(count):
        best = engine.rank(REQUEST, NOW).targets[0]
        inflight.reserve(best.target_id, NOW)
        chosen[best.target_id.split("|")[1]] += 1
    return chosen


def put(store: StateStore, name: str, **fields: Any) -> None:
    key = TargetKey("m", "n1", f"http://{name}")
    changes = {"last_updated": NOW - 0.5, **fields}
    store.apply_model_delta(ModelStateDelta(key, 1, changes))


def test_a_gpu_twice_as_fast_gets_about_twice_the_new_work() -> None:
    store = StateStore()
    put(store, "fast", **FAST)
    put(store, "slow", **SLOW)
    chosen = route(store, 300)
    assert chosen["http://fast"] == 200
    assert chosen["http://slow"] == 100


def test_measured_generation_rates_split_work_by_throughput() -> None:
    # No ITL histogram (a runtime that only counts tokens): tokens/s per running sequence.
    store = StateStore()
    put(store, "fast", generation_tokens_per_s=90.0, running=1.0, ttft_s=0.1, e2e_s=1.1)
    put(store, "slow", generation_tokens_per_s=30.0, running=1.0, ttft_s=0.1, e2e_s=3.1)
    chosen = route(store, 400)
    assert chosen["http://fast"] == 300
    assert chosen["http://slow"] == 100

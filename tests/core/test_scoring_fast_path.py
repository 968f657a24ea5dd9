"""The decision hot path's shortcuts give exactly what the plain code gives: views built without
the attrs constructor, the tracker's corrections in one call, per-state speeds looked up, and
column scorers whose results are built only for the returned targets."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import attrs
import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import (
    GpuKey,
    GpuState,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.scoring import capacity
from infermesh.core.scoring.capacity import decode_rate, state_features, tokens_per_request
from infermesh.core.scoring.columns import ColumnScorer, ScoreColumn, column_of
from infermesh.core.scoring.engine import ScoringEngine, WeightedScorer
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.rows import candidate_row
from infermesh.core.scoring.sampling import CandidateSampler
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore
from infermesh.core.scoring.views import ViewTable, make_view, table_of

KEY = TargetKey(model="m", node="n0", endpoint="http://n0:8000")
NOW = 50.0


def fields_of(view: TargetView) -> dict[str, object]:
    return {f.name: getattr(view, f.name) for f in attrs.fields(TargetView)}


@pytest.mark.parametrize(
    ("running", "waiting", "in_flight", "finished", "before"),
    [
        (3.0, 2.0, 0, 0, 0),
        (3.0, 2.0, 4, 0, 0),
        (3.0, 2.0, 1, 1, 0),  # finished: comes off the queue
        (3.0, 1.0, 0, 3, 0),  # more finished than queued: off running too
        (0.0, 0.0, 0, 0, 2),  # sent before the scrape, not counted yet
        (-1.0, 0.0, 0, 0, 0),  # odd telemetry takes the constructor's path
        (math.nan, 1.0, 2, 0, 0),
    ],
)
def test_make_view_equals_the_target_view_constructor(
    running: float, waiting: float, in_flight: int, finished: int, before: int
) -> None:
    state = ModelState(key=KEY, running=running, waiting=waiting, last_updated=NOW)
    gpus = (GpuState(key=GpuKey(node="n0", gpu_uuid="GPU-0")),)
    args = (state, in_flight, gpus, 0.2, 0.1, NOW, finished, before, 0.003)
    fast, plain = make_view(*args), TargetView(*args)
    assert repr(fields_of(fast)) == repr(fields_of(plain))  # repr: NaN == NaN
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.in_flight = 0  # type: ignore[misc]


def test_view_inputs_match_the_trackers_counts_and_are_empty_for_an_untouched_target() -> None:
    tracker = InflightTracker(id_prefix="t")
    tracker.reserve("a", 9.5)  # sent before the scrape at 10.0
    finished = tracker.reserve("a", 9.0)
    tracker.release(finished.reservation_id, 10.5)
    tracker.reserve("a", 11.0)  # sent after it
    tracker.record_outcome("a", ok=False, status=500, ttft_s=0.25)
    tracker.record_outcome("b", ok=True, status=200, ttft_s=0.5)
    counts = (
        tracker.in_flight("a", 10.0),
        tracker.finished_unseen("a", 10.0),
        tracker.open_before("a", 10.0, 5.0),
    )
    assert counts == (1, 1, 1)
    assert tracker.view_inputs("a", 10.0, 5.0) == (*counts, 0.25, 0.2)
    assert tracker.view_inputs("b", 10.0, 5.0) == (0, 0, 0, 0.5, 0.0)
    assert tracker.view_inputs("untouched", 10.0, 5.0) == (0, 0, 0, None, 0.0)


def test_a_states_speed_is_computed_once_and_a_new_state_gets_its_own() -> None:
    slow = ModelState(key=KEY, itl_s=0.04, ttft_s=0.1, e2e_s=2.1)
    first = state_features(slow)
    assert state_features(slow) is first  # looked up, not recomputed
    speed = decode_rate(slow)
    assert speed is not None
    assert speed.tokens_per_s == pytest.approx(25.0)
    assert first.decode_tokens == pytest.approx(50.0)  # (2.1 - 0.1) s at 25 tokens/s
    fast = attrs.evolve(slow, itl_s=0.01, version=2)  # what the store does on a delta
    fast_speed = decode_rate(fast)
    assert fast_speed is not None
    assert fast_speed.tokens_per_s == pytest.approx(100.0)
    views = [TargetView(state=slow), TargetView(state=fast)]
    request = RequestFeatures(model="m")
    # (2.1 - 0.1) s at 25 and at 100 tokens/s: the median of 50 and 200.
    assert tokens_per_request(views, request) == pytest.approx(125.0)


def test_the_store_has_each_states_speed_ready_before_a_decision() -> None:
    store = StateStore()
    store.apply_model_delta(ModelStateDelta(KEY, 1, {"itl_s": 0.02, "last_updated": NOW}))
    (state,) = store.candidates("m")
    cached = capacity.FEATURES_BY_ID.get(id(state))
    assert cached is not None
    assert cached.state is state
    store.apply_model_delta(ModelStateDelta(KEY, 2, {"itl_s": 0.05}))
    (newer,) = store.candidates("m")
    assert (
        id(state) not in capacity.FEATURES_BY_ID
        or capacity.FEATURES_BY_ID[id(state)].state is not state
    )
    speed = decode_rate(newer)
    assert speed is not None
    assert speed.tokens_per_s == pytest.approx(20.0)


class HalfScorer(ColumnScorer):
    name = "half"

    def __init__(self) -> None:
        self.built: list[int] = []

    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        def result(i: int) -> ScoreResult:
            self.built.append(i)
            return ScoreResult(0.5, f"target {i}")

        return ScoreColumn([0.5] * len(targets), result)


class OverridingScorer(HalfScorer):
    def score(
        self, request: RequestFeatures, targets: Sequence[TargetView]
    ) -> Sequence[ScoreResult]:
        return [ScoreResult(1.0, "overridden")] * len(targets)


class BrokenColumnScorer(HalfScorer):
    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        return ScoreColumn([1.5] * len(targets), lambda i: ScoreResult(1.0, "never read"))


def store_of(count: int) -> StateStore:
    store = StateStore()
    for i in range(count):
        key = TargetKey(model="m", node=f"n{i}", endpoint=f"http://n{i}:8000")
        store.apply_model_delta(ModelStateDelta(key, 1, {"running": float(i), "last_updated": NOW}))
    return store


def test_a_column_scorer_builds_results_only_for_the_returned_targets() -> None:
    half = HalfScorer()
    engine = ScoringEngine(store_of(10), InflightTracker(), [WeightedScorer("half", half, 1.0)])
    ranking = engine.rank(RequestFeatures(model="m"), NOW, max_targets=2)
    assert len(ranking.targets) == 2
    assert sorted(half.built) == sorted(
        int(t.results[0].reason.split()[1]) for t in ranking.targets
    )
    assert len(half.built) == 2
    assert half.score(RequestFeatures(model="m"), [TargetView(state=ModelState(key=KEY))]) == [
        ScoreResult(0.5, "target 0")
    ]


def test_a_column_scorer_that_overrides_score_is_used_as_a_plain_scorer() -> None:
    assert column_of(HalfScorer()) is not None
    assert column_of(OverridingScorer()) is None
    engine = ScoringEngine(
        store_of(3), InflightTracker(), [WeightedScorer("o", OverridingScorer(), 1.0)]
    )
    ranking = engine.rank(RequestFeatures(model="m"), NOW)
    assert {t.results[0].reason for t in ranking.targets} == {"overridden"}


def test_a_column_out_of_range_counts_as_a_failed_scorer() -> None:
    engine = ScoringEngine(
        store_of(3), InflightTracker(), [WeightedScorer("broken", BrokenColumnScorer(), 1.0)]
    )
    ranking = engine.rank(RequestFeatures(model="m"), NOW)
    assert engine.scorer_failures == {"broken": 1}
    assert {t.results[0].reason for t in ranking.targets} == {
        "scorer failed (ValueError: score 1.5 outside [0, 1]): neutral"
    }
    assert {t.score for t in ranking.targets} == {0.5}


def test_builtin_column_scorers_give_the_same_results_as_their_score() -> None:
    store = store_of(12)
    odd_usage = (math.nan, -0.5, 0.0, 0.0004, 0.0005, 0.4996, 1.0, 1.7, math.inf)
    for i, usage in enumerate(odd_usage):
        key = TargetKey(model="m", node=f"n{i}", endpoint=f"http://n{i}:8000")
        store.apply_model_delta(ModelStateDelta(key, 2, {"kv_cache_usage": usage, "itl_s": 0.02}))
    registered = {s.name: s for s in builtin_scorers()}
    engine = ScoringEngine.from_config(store, InflightTracker(), registered, ScoringConfig())
    request = RequestFeatures(model="m", max_output_tokens=64)
    ranking = engine.rank(request, NOW)
    views = [t.view for t in ranking.targets]
    for index, ws in enumerate(engine.scorers):
        plain = list(ws.scorer.score(request, views))
        assert plain == [t.results[index] for t in ranking.targets], ws.name
        score_one = getattr(ws.scorer, "score_one", None)
        if score_one is not None:  # the per-target rule the column must agree with
            assert plain == [score_one(request, v) for v in views], ws.name


def view_args(
    running: float, in_flight: int, finished: int, before: int, rtt_s: float | None
) -> tuple[
    ModelState, int, tuple[GpuState, ...], float | None, float, float, int, int, float | None
]:
    state = ModelState(key=KEY, running=running, waiting=1.0, last_updated=NOW, itl_s=0.02)
    gpus = (GpuState(key=GpuKey(node="n0", gpu_uuid="GPU-0")),)
    return (state, in_flight, gpus, 0.2, 0.1, NOW, finished, before, rtt_s)


def add_row(table: ViewTable, args: tuple[Any, ...]) -> None:
    state, in_flight, gpus, ttft, error_rate, _, finished, before, rtt_s = args
    table.add(
        state, state.key.target_id, in_flight, gpus, ttft, error_rate, finished, before, rtt_s
    )


def test_a_view_table_reads_as_the_views_make_view_builds_each_built_once() -> None:
    rows = [
        view_args(3.0, 2, 0, 0, None),
        view_args(3.0, 1, 2, 0, 0.004),  # finished since the scrape: corrected
        view_args(0.0, 0, 0, 3, None),  # sent before the scrape, not counted yet
        view_args(math.nan, 1, 0, 0, None),  # odd telemetry
    ]
    table = ViewTable(NOW)
    for args in rows:
        add_row(table, args)
    expected = [make_view(*args) for args in rows]
    assert len(table) == 4
    assert [repr(fields_of(v)) for v in table] == [repr(fields_of(v)) for v in expected]
    assert repr(table.loads) == repr([v.load for v in expected])
    assert table.unseen == [v.unseen for v in expected]
    assert table.finished_unseen == [0, 2, 0, 0]
    assert table.rtts == [None, 0.004, None, None]
    assert table.gpus == [v.gpus for v in expected]
    assert table.ids == [KEY.target_id] * 4
    assert table.features == [state_features(v.state) for v in expected]
    assert table[0] is table[0]
    assert table[-1] is table[3]
    assert table[1:3] == [table[1], table[2]]
    with pytest.raises(IndexError):
        table[4]
    with pytest.raises(IndexError):
        table[-5]
    part = table.subset([2, 0])
    assert part[0] is table[2]
    assert part[1] is table[0]
    assert part.loads == [table.loads[2], table.loads[0]]
    again = table_of(list(table))
    assert again is not table
    assert table_of(table) is table
    assert repr(again.loads) == repr(table.loads)  # repr: the NaN row too
    assert [again[i] for i in range(4)] == list(table)


def test_a_ranked_targets_view_equals_the_engines_own_view_of_it() -> None:
    store = store_of(20)
    inflight = InflightTracker()
    registered = {s.name: s for s in builtin_scorers()}
    engine = ScoringEngine.from_config(store, inflight, registered, ScoringConfig())
    for i in range(0, 20, 3):  # corrections on some targets: in flight, finished since
        target_id = store.candidates("m")[i].key.target_id
        inflight.reserve(target_id, NOW + 0.1)
        done = inflight.reserve(target_id, NOW - 0.5)
        inflight.release(done.reservation_id, NOW + 0.2)
    ranking = engine.rank(RequestFeatures(model="m", prefix_key=7), NOW + 0.3)
    assert len(ranking.targets) == 20
    for target in ranking.targets:
        assert fields_of(target.view) == fields_of(engine.view(target.state, NOW + 0.3))


@pytest.mark.parametrize("count", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_sampled_candidates_are_the_draws_randrange_would_make(count: int) -> None:
    states = tuple(
        ModelState(key=TargetKey(model="m", node=f"n{i:05d}", endpoint="e"), running=float(i))
        for i in range(count)
    )
    keys = tuple(s.key for s in states)
    ids = tuple(k.target_id for k in keys)
    sampler = CandidateSampler(8, seed=42)
    if not sampler.applies(count):
        return
    rows = [candidate_row(state) for state in states]
    order = list(sampler.order("m", keys, rows, ids, RequestFeatures(model="m"), NOW))
    reference = random.Random(42)
    expected = list(range(sampler.low_load))  # the least loaded: the lowest running
    for _ in range(16):
        i = reference.randrange(count)
        if i not in expected:
            expected.append(i)
    assert order == expected

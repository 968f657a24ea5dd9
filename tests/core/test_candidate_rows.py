"""The store's per-model candidate rows read as the states they stand for, stay current as deltas
land (patched in place, rebuilt when membership changes), and the engine's table built from them
reads as the views `make_view` builds."""

from __future__ import annotations

import attrs
import pytest

from infermesh.core.contracts import TargetView
from infermesh.core.model import (
    GpuKey,
    GpuState,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.scoring.capacity import kv_permille, state_features
from infermesh.core.scoring.inflight import NOTHING_TRACKED, InflightTracker
from infermesh.core.scoring.rows import (
    LAST_UPDATED_AT,
    PLAIN_AT,
    CandidateRow,
    candidate_row,
    row_field,
)
from infermesh.core.scoring.scorers import GpuHealthScorer, NetPenaltyScorer
from infermesh.core.scoring.state import StateStore
from infermesh.core.scoring.views import ViewTable, make_view

NOW = 50.0


def key(i: int, model: str = "m") -> TargetKey:
    return TargetKey(model=model, node=f"n{i}", endpoint=f"http://n{i}:8000")


def delta(i: int, version: int, **changes: object) -> ModelStateDelta:
    return ModelStateDelta(key(i), version, {"last_updated": NOW, **changes})


def fields_of(view: TargetView) -> dict[str, object]:
    return {f.name: getattr(view, f.name) for f in attrs.fields(TargetView)}


def test_a_row_reads_as_its_state() -> None:
    state = ModelState(
        key=key(1),
        running=3.0,
        waiting=2.0,
        kv_cache_usage=0.4567,
        itl_s=0.02,
        e2e_s=1.5,
        last_updated=NOW,
    )
    row = candidate_row(state)
    assert row == CandidateRow(
        state,
        key(1).target_id,
        "n1",
        state_features(state),
        True,
        NOW,
        5.0,
        kv_permille(0.4567),
        state.work_left_with_s(0.0),
    )
    assert row[PLAIN_AT] is row.plain
    assert row[LAST_UPDATED_AT] is row.last_updated
    assert row_field("load")(row) == row.load
    assert list(map(row_field("kv_permille"), [row, row])) == [row.kv_permille] * 2
    with pytest.raises(ValueError, match="no field 'loadz'"):
        row_field("loadz")
    labelled = attrs.evolve(state, labels=Labels(gpu_uuid="GPU-1"))
    assert not candidate_row(labelled).plain  # the engine checks its GPUs
    assert not candidate_row(attrs.evolve(state, warming=True)).plain
    assert not candidate_row(attrs.evolve(state, loaded=False)).plain
    assert not candidate_row(attrs.evolve(state, healthy=False)).plain


def test_rows_follow_the_candidates_as_deltas_land() -> None:
    store = StateStore()
    for i in (2, 0, 1):
        store.apply_model_delta(delta(i, 1, running=float(i)))
    rows = store.candidate_rows("m")
    assert [row.state for row in rows] == list(store.candidates("m"))
    # A value change patches the row in place: same list, new row.
    store.apply_model_delta(delta(1, 2, running=7.0))
    assert store.candidate_rows("m") is rows
    assert rows[1] == candidate_row(store.candidates("m")[1])
    assert rows[1].load == 7.0
    # A new member (or one that leaves) gives a new list, in candidate order.
    store.apply_model_delta(ModelStateDelta(key(3), 1, {"adapters": ("lora",)}))
    assert store.candidate_rows("lora")[0].state.key == key(3)
    store.apply_model_delta(delta(5, 1))
    after = store.candidate_rows("m")
    assert after is not rows
    assert [row.state for row in after] == list(store.candidates("m"))
    store.apply_model_delta(ModelStateDelta(key(3), 2, {"adapters": ()}))
    assert store.candidate_rows("lora") == []
    assert store.candidate_rows("unknown") == []
    assert store.candidate_keys("unknown") == ()


def test_a_stale_delta_leaves_the_rows_alone() -> None:
    store = StateStore()
    store.apply_model_delta(delta(0, 2, running=1.0))
    rows = list(store.candidate_rows("m"))
    assert not store.apply_model_delta(delta(0, 1, running=9.0))
    assert list(store.candidate_rows("m")) == rows


def test_the_engines_table_reads_as_the_views_make_view_builds() -> None:
    gpus = (GpuState(key=GpuKey(node="n0", gpu_uuid="GPU-0")),)
    states = [
        ModelState(key=key(0), running=3.0, waiting=1.0, last_updated=NOW, itl_s=0.02),
        ModelState(key=key(1), running=0.0, waiting=0.0, last_updated=NOW),
        ModelState(key=key(2), running=float("nan"), waiting=1.0, last_updated=NOW),
    ]
    rows = [candidate_row(state) for state in states]
    ids = [row.target_id for row in rows]
    cases: list[list[tuple[int, int, int, float | None, float]]] = [
        [NOTHING_TRACKED] * 3,  # nothing in flight (odd telemetry on the last)
        [NOTHING_TRACKED] * 2 + [(2, 0, 0, 0.3, 0.1)],
        [(1, 0, 0, None, 0.0), (0, 1, 0, None, 0.0), (0, 0, 2, 0.2, 0.5)],  # corrections
    ]
    for case in ([NOTHING_TRACKED] * 2, *cases):
        count = len(case)
        table = ViewTable.of_rows(
            NOW, rows[:count], ids[:count], list(case), [gpus] * count, [None, 0.004, None][:count]
        )
        expected = [
            make_view(state, t[0], gpus, t[3], t[4], NOW, t[1], t[2], rtt)
            for state, t, rtt in zip(states, case, [None, 0.004, None], strict=False)
        ]
        assert [repr(fields_of(v)) for v in table] == [repr(fields_of(v)) for v in expected]
        assert repr(table.loads) == repr([v.load for v in expected])
        assert table.unseen == [v.unseen for v in expected]
        assert table.finished_unseen == [v.finished_unseen for v in expected]
        assert table.features == [state_features(state) for state in states[:count]]
        assert table.rows == rows[:count]
        assert table.subset([1, 0]).rows == [rows[1], rows[0]]


def test_view_inputs_many_equals_one_call_per_target() -> None:
    tracker = InflightTracker()
    ids = [key(i).target_id for i in range(3)]
    assert tracker.view_inputs_many(ids, [NOW] * 3, 5.0) == [NOTHING_TRACKED] * 3
    tracker.reserve(ids[0], NOW + 1.0)
    done = tracker.reserve(ids[1], NOW - 1.0)
    tracker.release(done.reservation_id, NOW + 0.5)
    tracker.record_outcome(ids[2], ok=True, status=200, ttft_s=0.25)
    since = [NOW, NOW, NOW]
    expected = [tracker.view_inputs(target_id, NOW, 5.0) for target_id in ids]
    assert tracker.view_inputs_many(ids, since, 5.0) == expected
    assert expected[0][0] == 1  # in flight
    assert expected[2][3] == 0.25  # its TTFT


def test_no_rtt_or_gpu_telemetry_gives_each_target_the_shared_result() -> None:
    request = RequestFeatures(model="m")
    views = [
        make_view(ModelState(key=key(i), last_updated=NOW), 0, (), None, 0.0, NOW, 0, 0, None)
        for i in range(3)
    ]
    for scorer in (NetPenaltyScorer(), GpuHealthScorer()):
        column = scorer.score_column(request, views)
        per_target = [scorer.score_one(request, view) for view in views]
        assert list(column.scores) == [r.score for r in per_target]
        assert [column.result(i) for i in range(3)] == per_target

"""The decision-cost benchmark's report, arguments and synthetic candidates (no timing asserted)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType

import pytest

from infermesh.core.config import ScoringConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.decision import report

    return report


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks import decision_cost

    return decision_cost


def test_row_percentiles(report: ModuleType) -> None:
    row = report.row_from_samples("in-process", 10, [0.001 * i for i in range(1, 101)])
    assert row.decisions == 100
    assert row.p50_ms == pytest.approx(50.5)
    assert row.p99_ms == pytest.approx(99.01)
    assert row.max_ms == pytest.approx(100.0)


def test_goal_only_judges_in_process_at_10000(report: ModuleType) -> None:
    fast = report.row_from_samples("in-process", 10_000, [0.0005] * 100)
    slow = report.row_from_samples("in-process", 10_000, [0.002] * 100)
    uds = report.row_from_samples("agent uds", 10_000, [0.5] * 100)
    assert report.goal_met([fast, uds]) is True
    assert report.goal_met([slow]) is False
    assert report.goal_met([report.row_from_samples("in-process", 100, [0.5] * 100)]) is None
    assert "MISSED" in report.render_table([slow])
    line = json.loads(report.render_json([fast], settings={"sizes": [10000]}, skipped={}))
    assert line["benchmark"] == "decision_cost"
    assert line["goals"] == {"in_process_p99_lt_1ms_at_10000": True}
    assert line["results"][0]["p99_ms"] == pytest.approx(0.5)


def test_arguments(script: ModuleType) -> None:
    args = script.parse_args(["--sizes", "10,100", "--paths", "in-process"])
    assert args.sizes == (10, 100)
    assert args.paths == ("in-process",)
    assert args.max_candidates == ScoringConfig().max_candidates
    assert script.parse_args(["--max-candidates", "0"]).max_candidates == 0
    for bad in (
        ["--sizes", "0"],
        ["--sizes", "x"],
        ["--paths", "tcp"],
        ["--decisions", "5"],
        ["--max-candidates", "-1"],
        ["--deltas-per-decision", "-1"],
    ):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_candidates_are_seeded_and_all_ranked(script: ModuleType) -> None:
    from benchmarks.decision.states import candidate_deltas, model_for, requests

    assert candidate_deltas(5, 1.0, seed=3) == candidate_deltas(5, 1.0, seed=3)
    assert candidate_deltas(5, 1.0, seed=3) != candidate_deltas(5, 1.0, seed=4)
    request = requests(model_for(50), 1)[0]
    ranking = script.build_engine(candidate_deltas(50, 1000.0), 0).rank(request, 1000.0, 0)
    assert ranking.candidates == 50
    assert len(ranking.targets) == 50  # no cap: every candidate scored
    capped = script.build_engine(candidate_deltas(50, 1000.0), 20).rank(request, 1000.0, 0)
    assert capped.candidates == 50
    assert len(capped.targets) == 20


def test_in_process_run_times_every_decision(script: ModuleType) -> None:
    args = script.parse_args(["--sizes", "10", "--decisions", "100", "--paths", "in-process"])
    from benchmarks.decision.states import candidate_deltas, model_for, requests

    engine = script.build_engine(candidate_deltas(10, 5.0))
    started = time.perf_counter()
    latencies = script.time_in_process(engine, requests(model_for(10), 32), 5.0, args)
    assert len(latencies) == 100
    assert all(0 <= value <= time.perf_counter() - started for value in latencies)


def test_deltas_land_before_each_decision(script: ModuleType) -> None:
    from benchmarks.decision.states import (
        candidate_deltas,
        model_for,
        requests,
        telemetry_updates,
    )

    argv = ["--sizes", "10", "--decisions", "100", "--paths", "in-process"]
    args = script.parse_args([*argv, "--deltas-per-decision", "2"])
    deltas = candidate_deltas(10, 5.0)
    engine = script.build_engine(deltas)
    latencies = script.time_in_process(
        engine, requests(model_for(10), 32), 5.0, args, None, telemetry_updates(deltas)
    )
    assert len(latencies) == 100
    # 20 warm-up and 100 timed decisions, two fresh deltas before each
    assert engine.store.model_counts.applied == 10 + 2 * 120
    assert engine.store.model_counts.stale == 0
    first = next(telemetry_updates(deltas, seed=1))
    assert first == next(telemetry_updates(deltas, seed=1))
    assert first.version == 2


def test_cpu_times_are_reported_for_in_process_rows_only(
    report: ModuleType, script: ModuleType
) -> None:
    args = script.parse_args(["--sizes", "10", "--decisions", "100", "--paths", "in-process"])
    from benchmarks.decision.states import candidate_deltas, model_for, requests

    engine = script.build_engine(candidate_deltas(10, 5.0))
    cpu_times: list[float] = []
    latencies = script.time_in_process(engine, requests(model_for(10), 32), 5.0, args, cpu_times)
    assert len(cpu_times) == len(latencies) == 100
    assert all(value >= 0 for value in cpu_times)
    in_process = report.row_from_samples("in-process", 10, latencies, cpu_times)
    uds = report.row_from_samples("agent uds", 10, latencies)
    assert in_process.cpu_p99_ms >= in_process.cpu_p50_ms >= 0
    table = report.render_table([in_process, uds])
    assert "cpu p99" in table
    assert table.splitlines()[3].split()[-2:] == ["-", "-"]  # the uds row: not measured
    line = json.loads(report.render_json([uds], settings={}, skipped={}))
    assert line["results"][0]["cpu_p99_ms"] is None

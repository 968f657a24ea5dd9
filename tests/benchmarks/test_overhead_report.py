"""The router-overhead benchmark's arithmetic: percentiles, medians over repeats, comparisons.

No timing is asserted here (benchmarks measure, tests specify); these check that the figures the
benchmark prints are computed the way docs/benchmarks.md says.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def loadgen(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.overhead import loadgen

    return loadgen


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.overhead import report

    return report


def _sample(loadgen: ModuleType, report: ModuleType, latency_ms: float, rps: float) -> object:
    count = int(rps)
    result = loadgen.LoadResult(
        latencies_s=(latency_ms / 1000,) * count,
        ttfts_s=(),
        window_s=1.0,
        errors=0,
        first_error="",
        completed_total=count,
    )
    return report.Sample(load=result, cpu_us_per_request={"proxy": 100.0})


def test_percentile_interpolates_between_closest_ranks(loadgen: ModuleType) -> None:
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert loadgen.percentile([5.0], 99) == 5.0
    assert math.isnan(loadgen.percentile([], 50))


def test_percentile_outside_0_100_is_an_error(loadgen: ModuleType) -> None:
    with pytest.raises(ValueError, match="outside"):
        loadgen.percentile([1.0], 101)


@pytest.mark.anyio
async def test_load_without_clients_is_an_error(loadgen: ModuleType) -> None:
    spec = loadgen.LoadSpec(
        urls=["http://127.0.0.1:9/"],
        body=b"{}",
        stream=False,
        concurrency=0,
        warmup_s=0.0,
        duration_s=0.1,
    )
    with pytest.raises(ValueError, match="concurrency"):
        await loadgen.run_load(spec)


def test_rows_compare_each_mode_with_direct_and_vllm_router(
    loadgen: ModuleType, report: ModuleType
) -> None:
    phase = report.Phase(stream=False, concurrency=16)
    results = {
        ("direct", phase): [_sample(loadgen, report, 2.0, 1000)],
        ("infermesh", phase): [
            _sample(loadgen, report, 3.0, 300),
            _sample(loadgen, report, 5.0, 500),
            _sample(loadgen, report, 4.0, 400),
        ],
        ("vllm-router", phase): [_sample(loadgen, report, 2.5, 800)],
    }
    rows = {row.mode: row for row in report.rows_from_results(results)}
    infermesh = rows["infermesh"]
    assert infermesh.rps == pytest.approx(400)  # median of the repeats' req/s
    assert infermesh.added_p50_ms == pytest.approx(2.0)
    assert infermesh.ratio_to_vllm_router == pytest.approx(0.5)
    assert rows["direct"].added_p50_ms == 0.0


def test_json_is_one_line_with_goals_and_no_nan(loadgen: ModuleType, report: ModuleType) -> None:
    phase = report.Phase(stream=True, concurrency=1)
    results = {
        ("direct", phase): [_sample(loadgen, report, 1.0, 100)],
        ("infermesh", phase): [_sample(loadgen, report, 1.5, 80)],
    }
    line = report.render_json(report.rows_from_results(results), settings={}, skipped={})
    assert "\n" not in line
    decoded = json.loads(line)
    assert decoded["goals"]["added_p50_le_1ms_stream_c1"] is True
    assert decoded["goals"]["rps_ge_0.5x_vllm_router_stream_c1"] is None  # no vllm-router
    assert decoded["results"][1]["ratio_to_vllm_router"] is None

"""The routing-quality benchmark's report and arguments: figures, goals, fleet parsing.

No timing is asserted (benchmarks measure, tests specify): these check that the table, the
goals and the JSON line are computed from the records the way docs/benchmarks.md says.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import ModuleType

import attrs
import pytest

from infermesh.dev.loadgen import LoadReport, RequestRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import report

    return report


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import fleet

    return fleet


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks import routing_quality

    return routing_quality


def _record(
    ttft_s: float,
    e2e_s: float,
    tag: str = "r0-h100",
    ok: bool = True,
    start_s: float = 0.0,
    tokens: int = 10,
) -> RequestRecord:
    return RequestRecord(
        ok=ok,
        status=200 if ok else 503,
        stream=True,
        prefix_group=0,
        start_s=start_s,
        e2e_s=e2e_s,
        ttft_s=ttft_s,
        completion_tokens=tokens if ok else 0,
        response_id=f"chatcmpl-{tag}-abc123",
        error="" if ok else "overloaded",
    )


def _report(
    ttfts_s: list[float], wall_s: float = 10.0, tag: str = "r0-h100", tokens: int = 10
) -> LoadReport:
    """One send every 0.5 s; each answer's tokens all arrive with its first chunk."""
    records = (
        _record(t, t + 1.0, tag, start_s=0.5 * i, tokens=tokens) for i, t in enumerate(ttfts_s)
    )
    return LoadReport(records=tuple(records), wall_s=wall_s)


def test_row_percentiles_throughput_and_replica_share(report: ModuleType) -> None:
    records = [
        _record(0.1 * (i + 1), 1.0, "r0-h100" if i < 3 else "r3-h100x0.25") for i in range(4)
    ]
    records.append(_record(0.0, 0.5, ok=False))
    row = report.row_from_report("infermesh", LoadReport(records=tuple(records), wall_s=2.0))
    assert (row.requests, row.ok, row.errors) == (5, 4, 1)
    assert row.ttft_p50_ms == pytest.approx(250.0)
    assert row.e2e_p99_ms == pytest.approx(1000.0)
    assert row.ok_per_s == pytest.approx(2.0)
    assert row.output_tokens_per_s == pytest.approx(20.0)
    assert row.share_by_replica == {"r0-h100": 0.75, "r3-h100x0.25": 0.25}
    assert row.first_error == "HTTP 503: overloaded"


def test_goals_compare_p95_with_round_robin_and_best_peer(report: ModuleType) -> None:
    rows = [
        report.row_from_report("infermesh", _report([0.1] * 20)),
        report.row_from_report("vllm-router round_robin", _report([0.4] * 20)),
        report.row_from_report("vllm-router cache_aware", _report([0.2] * 20)),
    ]
    goals = report.goals(rows)
    assert goals == {
        "ttft_p95_le_0.5x_round_robin": True,
        "ttft_p95_le_0.8x_best_peer": True,
        "throughput_ge_best_peer": True,
    }
    text = report.render_goals(rows)
    assert "vs round robin: 0.25x  met" in text
    assert "vs best peer (vllm-router cache_aware): 0.50x  met" in text


def test_goals_missed_and_unmeasured(report: ModuleType) -> None:
    slow = [report.row_from_report("infermesh", _report([0.35] * 20, wall_s=20.0, tokens=5))]
    peer = report.row_from_report("vllm-router round_robin", _report([0.4] * 20))
    assert report.goals([*slow, peer]) == {
        "ttft_p95_le_0.5x_round_robin": False,
        "ttft_p95_le_0.8x_best_peer": False,
        "throughput_ge_best_peer": False,
    }
    assert "MISSED" in report.render_goals([*slow, peer])
    assert set(report.goals([peer]).values()) == {None}


def test_table_and_json_line(report: ModuleType) -> None:
    rows = [
        report.row_from_report("infermesh", _report([0.1, 0.2])),
        report.row_from_report("vllm-router round_robin", LoadReport(records=(), wall_s=1.0)),
    ]
    table = report.render_table(rows)
    assert table.splitlines()[0].startswith("mode")
    assert "vllm-router round_robin" in table
    assert " - " in table
    line = json.loads(report.render_json(rows, settings={"seed": 7}, skipped={"x": "why"}))
    assert line["benchmark"] == "routing_quality"
    assert line["results"][0]["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert line["results"][1]["ttft_ms"]["p95"] is None
    assert line["settings"] == {"seed": 7}
    assert line["skipped"] == {"x": "why"}
    assert math.isnan(rows[1].ttft_p95_ms)


def test_parse_fleet(fleet: ModuleType) -> None:
    replicas = fleet.parse_fleet("h100, a10,h100@0.25")
    assert [r.label for r in replicas] == ["h100", "a10", "h100@0.25"]
    assert replicas[2].speed == 0.25
    for bad in ("h100", "h100,tpu", "h100,a10@0", "h100,a10@1.5", "h100,a10@x"):
        with pytest.raises(argparse.ArgumentTypeError):
            fleet.parse_fleet(bad)


def test_arguments_and_the_same_trace_for_every_mode(script: ModuleType) -> None:
    args = script.parse_args(["--routers", "infermesh,cache_aware", "--requests", "12"])
    assert args.routers == ("infermesh", "cache_aware")
    first = script.trace_spec("http://127.0.0.1:1", args)
    second = script.trace_spec("http://127.0.0.1:2", args)
    assert (first.seed, first.rate_per_s, first.num_requests, first.mix) == (
        second.seed,
        second.rate_per_s,
        second.num_requests,
        second.mix,
    )
    assert first.stream_fraction == 1.0
    assert first.duration_s is None
    with pytest.raises(SystemExit):
        script.parse_args(["--routers", "least_loaded"])
    with pytest.raises(SystemExit):
        script.parse_args(["--rate", "0"])


def test_pooled_rows_take_percentiles_over_every_seeds_requests(report: ModuleType) -> None:
    fast = LoadReport(
        records=tuple(_record(0.01, 0.1, start_s=0.1 * i) for i in range(10)), wall_s=1.0
    )
    slow = LoadReport(records=tuple(_record(1.0, 2.0, tag="r1-a10") for _ in range(10)), wall_s=3.0)
    pooled = report.row_from_reports("infermesh", [fast, slow])
    assert pooled.requests == pooled.ok == 20
    assert pooled.ttft_p50_ms == 505.0  # interpolated between the two halves
    assert pooled.ttft_p95_ms == 1000.0
    assert pooled.ok_per_s == 5.0  # 20 requests over 4 s of traces
    assert pooled.share_by_replica == {"r0-h100": 0.5, "r1-a10": 0.5}
    assert report.row_from_report("infermesh", fast) == report.row_from_reports("infermesh", [fast])


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("7,x", "comma list of integers"), ("7,7", "names a seed twice")],
)
def test_bad_seed_lists_are_refused_with_what_is_wrong(
    script: ModuleType, seeds: str, message: str
) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        script.parse_seeds(seeds)
    assert script.parse_seeds("7,11,13") == (7, 11, 13)


@pytest.fixture
def requests_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import requests

    return requests


def _sent(index: int, ttft_s: float, tag: str, cached: int | None) -> RequestRecord:
    return RequestRecord(
        ok=True,
        status=200,
        stream=True,
        prefix_group=index % 2,
        start_s=0.0,
        e2e_s=1.0,
        ttft_s=ttft_s,
        completion_tokens=10,
        response_id=f"chatcmpl-{tag}-{index:04x}",
        request_id=f"7-{index}",
        index=index,
        cached_tokens=cached,
    )


def _logged(
    index: int, tag: str, cached: int, queue_s: float, prefill_s: float, arrived: float = 100.0
) -> dict[str, object]:
    return {
        "x_request_id": f"7-{index}",
        "arrived_unix_s": arrived,
        "response_id": f"chatcmpl-{tag}-{index:04x}",
        "prompt_tokens": 1500,
        "cached_tokens": cached,
        "queue_s": queue_s,
        "prefill_s": prefill_s,
        "ttft_s": queue_s + prefill_s,
        "waiting_at_arrival": 2,
        "running_at_arrival": 5,
        "preemptions": 0,
        "finish_reason": "length",
    }


def test_per_request_rows_join_the_replica_logs_and_the_tail_names_cold_prefills(
    requests_module: ModuleType,
) -> None:
    # 20 requests: 19 warm and quick on the H100, one cold on the slow replica (the tail).
    records = [_sent(i, 0.030, "r0-h100", 1488) for i in range(19)]
    records.append(_sent(19, 0.400, "r3-h100x0.25", None))  # a router that drops the usage
    h100 = [_logged(i, "r0-h100", 1488, 0.005, 0.020) for i in range(19)]
    slow = [
        _logged(19, "r3-h100x0.25", 0, 0.100, 0.280),
        # the router's hedge to another replica, 200 ms later, aborted: the first one answered
        {
            **_logged(19, "r2-a10", 0, 0.0, 0.0, arrived=100.2),
            "response_id": "chatcmpl-r2-a10-x",
            "finish_reason": "abort",
        },
    ]
    rows = requests_module.join_requests(7, "infermesh", list(reversed(records)), [h100, slow])
    assert [row.index for row in rows] == list(range(20))
    cold = rows[19]
    assert (cold.replica, cold.cache, cold.cached_tokens) == ("r3-h100x0.25", "cold", 0)
    assert (cold.queue_ms, cold.prefill_ms) == (100.0, 280.0)
    assert cold.outside_engine_ms == pytest.approx(20.0)
    assert (cold.attempts, cold.hedge_wait_ms) == (2, 0.0)
    assert (rows[0].cache, rows[0].attempts) == ("warm", 1)
    lines = requests_module.to_jsonl(rows).splitlines()
    assert json.loads(lines[19])["request_id"] == "7-19"

    (tail,) = requests_module.tail_summary(rows)
    assert (tail.count, dict(tail.cache), dict(tail.replicas)) == (
        1,
        {"cold": 1},
        {"r3-h100x0.25": 1},
    )
    text = requests_module.render_tail([tail])
    assert "infermesh" in text
    assert "cold 1; hedged 1 (waited 0); r3-h100x0.25 1; queue 100, prefill 280" in text


def test_a_hedge_that_answered_first_counts_its_wait_apart_from_the_engine(
    requests_module: ModuleType,
) -> None:
    # The primary (A10, cold) was slow; the hedge to the H100 500 ms later answered warm.
    sent = attrs.evolve(_sent(0, 0.530, "r0-h100", 1488), response_id="chatcmpl-r0-h100-0000")
    primary = {**_logged(0, "r2-a10", 0, 0.0, 0.6), "response_id": "chatcmpl-r2-a10-0000"}
    primary["finish_reason"] = "abort"
    hedge = _logged(0, "r0-h100", 1488, 0.005, 0.010, arrived=100.5)
    (row,) = requests_module.join_requests(7, "infermesh", [sent], [[primary], [hedge]])
    assert (row.replica, row.cache, row.attempts) == ("r0-h100", "warm", 2)
    assert row.tried == ("r2-a10", "r0-h100")
    assert row.hedge_wait_ms == pytest.approx(500.0)
    assert row.outside_engine_ms == pytest.approx(15.0)


def test_a_request_no_replica_logged_is_unknown(requests_module: ModuleType) -> None:
    (row,) = requests_module.join_requests(
        11, "vllm-router round_robin", [_sent(0, 0.1, "r1", None)], []
    )
    assert (row.cache, row.queue_ms, row.outside_engine_ms) == ("unknown", None, None)


def test_the_agent_config_maps_each_runtime_to_its_emulated_gpu(
    fleet: ModuleType, tmp_path: Path
) -> None:
    from infermesh.core.config import load_config

    started = fleet.Fleet(
        bases=("http://127.0.0.1:8001", "http://127.0.0.1:8002"),
        dcgm_metrics_url="http://127.0.0.1:9400/metrics",
        gpu_uuids=("GPU-aaaaaaaa-0000-4000-8000-000000000001", "GPU-bbbbbbbb-0000-4000-8000-2"),
    )
    config = load_config(fleet.write_agent_config(tmp_path / "infermesh.toml", started), {})
    assert [r.gpus for r in config.runtimes] == [[uuid] for uuid in started.gpu_uuids]
    assert [(g.kind, g.url) for g in config.gpus] == [("dcgm", "http://127.0.0.1:9400/metrics")]
    bare = load_config(
        fleet.write_agent_config(tmp_path / "bare.toml", fleet.Fleet(bases=started.bases)), {}
    )
    assert [r.gpus for r in bare.runtimes] == [[], []]
    assert bare.gpus == []


def test_telemetry_and_per_request_flags(script: ModuleType) -> None:
    args = script.parse_args(["--no-gpu-telemetry", "--per-request", "out.jsonl"])
    assert args.no_gpu_telemetry
    assert args.per_request == "out.jsonl"
    assert not script.parse_args([]).no_gpu_telemetry

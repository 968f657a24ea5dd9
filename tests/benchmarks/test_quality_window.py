"""The routing-quality benchmark's `tok/s arr`: output tokens delivered while the trace was being
sent, over first send to last send, and the throughput goal judged on it (docs/benchmarks.md).

No timing is asserted: records are built by hand and the figures are computed from them.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

from infermesh.dev.loadgen import LoadReport, RequestRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import window

    return window


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.quality import report

    return report


def _streamed(
    start_s: float,
    ttft_s: float,
    itls_s: tuple[float, ...] = (),
    tokens: int | None = None,
    ok: bool = True,
    tag: str = "r0-h100",
) -> RequestRecord:
    chunks = len(itls_s) + 1
    return RequestRecord(
        ok=ok,
        status=200 if ok else 503,
        stream=True,
        prefix_group=0,
        start_s=start_s,
        e2e_s=ttft_s + sum(itls_s) + 0.01,
        ttft_s=ttft_s if ok else None,
        itls_s=itls_s if ok else (),
        completion_tokens=(chunks if tokens is None else tokens) if ok else 0,
        response_id=f"chatcmpl-{tag}-abc123",
        error="" if ok else "overloaded",
    )


def test_streamed_tokens_count_up_to_the_last_send(window: ModuleType) -> None:
    first = _streamed(start_s=10.0, ttft_s=1.0, itls_s=(1.0, 1.0, 1.0))  # tokens at 11..14
    last = _streamed(start_s=13.0, ttft_s=0.5)  # its token at 13.5, after the window
    result = window.arrival_window([first, last])
    assert result.window_s == pytest.approx(3.0)
    assert result.tokens == pytest.approx(3.0)  # 11, 12, 13 of the first; none of the last
    assert result.tokens_per_s == pytest.approx(1.0)
    assert result.sends_per_s == pytest.approx(1 / 3)  # one gap of 3 s


def test_a_chunk_of_several_tokens_counts_them_all(window: ModuleType) -> None:
    record = _streamed(start_s=0.0, ttft_s=1.0, itls_s=(1.0, 1.0, 1.0), tokens=8)
    assert window.tokens_within(record, 2.5) == pytest.approx(4.0)  # 2 of 4 chunks, 2 each
    assert window.tokens_within(record, 100.0) == pytest.approx(8.0)


def test_an_unstreamed_answer_counts_at_its_completion(window: ModuleType) -> None:
    record = RequestRecord(
        ok=True, status=200, stream=False, prefix_group=0, start_s=1.0, e2e_s=2.0,
        completion_tokens=6,
    )  # fmt: skip
    assert window.tokens_within(record, 2.9) == 0.0
    assert window.tokens_within(record, 3.0) == 6.0


def test_a_failed_request_widens_the_window_but_delivers_nothing(window: ModuleType) -> None:
    served = _streamed(start_s=0.0, ttft_s=0.1, itls_s=(0.1,))
    failed = _streamed(start_s=4.0, ttft_s=0.1, ok=False)
    result = window.arrival_window([served, failed])
    assert (result.window_s, result.tokens) == (pytest.approx(4.0), pytest.approx(2.0))
    assert window.tokens_within(failed, 100.0) == 0.0


def test_fewer_than_two_sends_have_no_window(window: ModuleType, report: ModuleType) -> None:
    assert math.isnan(window.arrival_window([]).tokens_per_s)
    assert math.isnan(window.arrival_window([_streamed(0.0, 0.1)]).tokens_per_s)
    rows = [
        report.row_from_report("infermesh", LoadReport((_streamed(0.0, 0.1),), wall_s=1.0)),
        report.row_from_report("vllm-router round_robin", LoadReport((), wall_s=1.0)),
    ]
    assert report.goals(rows)["throughput_ge_best_peer"] is None
    line = json.loads(report.render_json(rows, settings={}, skipped={}))
    assert line["results"][0]["window_tokens_per_s"] is None


def _trace(ttft_s: float, itl_s: float, tag: str) -> LoadReport:
    """Ten sends a second apart, 4 tokens each; every request completes."""
    records = tuple(_streamed(float(i), ttft_s, (itl_s,) * 3, tag=tag) for i in range(10))
    return LoadReport(records=records, wall_s=9.0 + ttft_s + 3 * itl_s)


def test_the_throughput_goal_is_judged_on_tokens_delivered_while_requests_arrived(
    report: ModuleType,
) -> None:
    # Both modes complete every request; the peer's answers take longer, so fewer of its
    # tokens arrive before the last send, while its req/s is the lower only by its straggler.
    ours = report.row_from_report("infermesh", _trace(0.1, 0.1, "r0-h100"))
    peer = report.row_from_report("vllm-router round_robin", _trace(0.3, 0.5, "r3-h100x0.25"))
    assert ours.window_s == peer.window_s == pytest.approx(9.0)
    assert ours.window_tokens_per_s == pytest.approx(36 / 9)  # all but the last request's 4
    assert peer.window_tokens_per_s == pytest.approx((8 * 4 + 2) / 9)
    assert report.goals([ours, peer])["throughput_ge_best_peer"] is True
    swapped = [replace(peer, mode="infermesh"), replace(ours, mode="vllm-router cache_aware")]
    assert report.goals(swapped)["throughput_ge_best_peer"] is False
    text = report.render_goals([ours, peer])
    assert "tok/s arr 4 vs best peer (vllm-router round_robin) 4: 1.059x  met" in text
    assert "req/s, not judged" in text
    table = report.render_table([ours, peer])
    assert "tok/s arr" in table.splitlines()[0]
    line = json.loads(report.render_json([ours, peer], settings={}, skipped={}))
    assert line["results"][0]["window_s"] == 9.0
    assert line["results"][1]["window_tokens_per_s"] == pytest.approx(3.8)
    assert line["results"][0]["sent_per_s"] == 1.0


def test_pooled_tok_s_arr_is_summed_tokens_over_summed_windows(report: ModuleType) -> None:
    short = LoadReport((_streamed(0.0, 0.1), _streamed(1.0, 5.0)), wall_s=6.0)  # 1 token in 1 s
    long = LoadReport((_streamed(0.0, 0.1, (0.1,) * 5), _streamed(3.0, 5.0)), wall_s=8.0)
    pooled = report.row_from_reports("infermesh", [short, long])
    assert pooled.window_s == pytest.approx(4.0)
    assert pooled.window_tokens_per_s == pytest.approx((1 + 6) / 4)
    assert pooled.sent_per_s == pytest.approx(2 / 4)

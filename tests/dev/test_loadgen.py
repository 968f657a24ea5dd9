"""The load generator against in-process emulators: records, percentiles, replica attribution."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import pytest

from infermesh.dev.loadgen import (
    LoadSpec,
    PromptMix,
    RequestRecord,
    percentile,
    replica_tag_of,
    run_load,
    summarize,
)
from infermesh.dev.profiles import DEFAULT_MODEL
from infermesh.dev.vllm_emulator import EmulatorServer

StartEmulator = Callable[..., Awaitable[EmulatorServer]]


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 100) == 4.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="within \\[0, 100\\]"):
        percentile(values, 101)


def test_replica_tag_is_read_from_the_response_id() -> None:
    assert replica_tag_of("chatcmpl-h100-0-0123abcd") == "h100-0"
    assert replica_tag_of("cmpl-0123abcd") == ""


def test_shared_prefix_mix_repeats_each_system_prompt_exactly() -> None:
    mix = PromptMix(num_prefixes=3, prefix_chars=500)
    first = mix.messages(1, random.Random(1))
    second = mix.messages(1, random.Random(2))
    assert first[0] == second[0]
    assert len(first[0]["content"]) == 500
    assert first[1] != second[1]
    assert mix.system_prompt(0) != mix.system_prompt(1)


def test_summary_uses_successful_requests_only() -> None:
    def record(ok: bool, e2e_s: float, ttft_s: float | None) -> RequestRecord:
        return RequestRecord(
            ok=ok,
            status=200 if ok else 503,
            stream=ttft_s is not None,
            prefix_group=0,
            start_s=0.0,
            e2e_s=e2e_s,
            ttft_s=ttft_s,
        )

    summary = summarize([record(True, 1.0, 0.1), record(True, 3.0, None), record(False, 9.0, None)])
    assert (summary.requests, summary.ok) == (3, 2)
    assert summary.e2e_p50_s == 2.0
    assert summary.ttft_p50_s == 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"duration_s": None}, "set duration_s or num_requests"),
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"stream_fraction": 1.5}, "stream_fraction must be in"),
    ],
)
def test_bad_load_specs_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoadSpec(base_url="http://x", model="m", **options)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_closed_loop_load_records_every_request(start: StartEmulator) -> None:
    server = await start(replica_tag="solo")
    seen: list[RequestRecord] = []
    spec = LoadSpec(
        base_url=server.url,
        model=DEFAULT_MODEL,
        concurrency=4,
        duration_s=None,
        num_requests=24,
        stream_fraction=0.5,
        max_tokens=6,
        seed=3,
        mix=PromptMix(num_prefixes=2, prefix_chars=400),
    )
    report = await run_load(spec, on_record=seen.append)

    assert len(report.records) == 24
    assert seen == list(report.records)
    assert all(r.ok for r in report.records), [r.error for r in report.records if not r.ok]
    assert set(report.by_replica()) == {"solo"}
    streamed = [r for r in report.records if r.stream]
    assert streamed
    assert all(r.ttft_s is not None and len(r.itls_s) == 5 for r in streamed)
    assert all(r.completion_tokens == 6 for r in report.records)
    assert report.summary.e2e_p50_s is not None


@pytest.mark.anyio
async def test_open_loop_load_and_the_completions_api(start: StartEmulator) -> None:
    server = await start()
    spec = LoadSpec(
        base_url=server.url,
        model=DEFAULT_MODEL,
        api="completion",
        rate_per_s=200.0,
        duration_s=None,
        num_requests=10,
        max_tokens=3,
    )
    report = await run_load(spec)
    assert len(report.records) == 10
    assert all(r.ok for r in report.records)


@pytest.mark.anyio
async def test_failed_requests_carry_the_status_and_message(start: StartEmulator) -> None:
    server = await start()
    spec = LoadSpec(base_url=server.url, model="no-such-model", duration_s=None, num_requests=2)
    report = await run_load(spec)
    assert [r.status for r in report.records] == [404, 404]
    assert "does not exist" in report.records[0].error
    assert report.summary.ok == 0

"""The routing simulator's workloads: reproducible per seed, at the asked rate, replayable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from infermesh.dev.sim.workloads import (
    MAX_CONTEXT_TOKENS,
    WORKLOADS,
    TraceError,
    generate,
    mmpp_arrivals,
    parse_trace,
    poisson_arrivals,
    read_trace,
    write_trace,
)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_same_seed_gives_the_same_requests(name: str) -> None:
    first = list(generate(name, random.Random(7), 60.0, 20.0))
    again = list(generate(name, random.Random(7), 60.0, 20.0))
    other = list(generate(name, random.Random(8), 60.0, 20.0))
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_requests_arrive_in_order_within_the_duration_and_fit_the_context(name: str) -> None:
    requests = list(generate(name, random.Random(3), 120.0, 10.0))
    arrivals = [request.arrival_s for request in requests]
    assert arrivals == sorted(arrivals)
    assert all(0.0 <= arrival < 120.0 for arrival in arrivals)
    assert len({request.request_id for request in requests}) == len(requests)
    assert all(r.prompt_tokens + r.output_tokens <= MAX_CONTEXT_TOKENS for r in requests)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_long_runs_arrive_at_the_asked_rate(name: str) -> None:
    # 2,000 s at 10/s: Poisson counts are within a few percent; MMPP bursts widen that.
    count = sum(1 for _ in generate(name, random.Random(11), 2000.0, 10.0))
    assert count == pytest.approx(20_000, rel=0.08)


def test_poisson_and_mmpp_have_the_same_mean_rate_but_mmpp_is_burstier() -> None:
    def per_second_counts(arrivals: list[float], seconds: int) -> list[int]:
        counts = [0] * seconds
        for arrival in arrivals:
            counts[int(arrival)] += 1
        return counts

    def variance(values: list[int]) -> float:
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)

    poisson = list(poisson_arrivals(random.Random(1), 20.0, 3000.0))
    mmpp = list(mmpp_arrivals(random.Random(1), 20.0, 3000.0))
    assert len(poisson) == pytest.approx(60_000, rel=0.03)
    assert len(mmpp) == pytest.approx(60_000, rel=0.08)
    poisson_var = variance(per_second_counts(poisson, 3000))
    assert poisson_var == pytest.approx(20.0, rel=0.15)  # Poisson: variance == mean
    assert variance(per_second_counts(mmpp, 3000)) > 3 * poisson_var


def test_chat_requests_share_their_tenants_system_prompt() -> None:
    requests = list(generate("chat", random.Random(5), 100.0, 10.0))
    by_tenant: dict[str, set[int]] = {}
    for request in requests:
        assert request.prefix_group == request.tenant
        by_tenant.setdefault(request.tenant, set()).add(request.prefix_tokens)
    assert len(by_tenant) > 4
    assert all(len(lengths) == 1 for lengths in by_tenant.values())  # one system prompt each


def test_session_turns_grow_and_repeat_the_previous_turn() -> None:
    requests = list(generate("sessions", random.Random(5), 300.0, 10.0))
    turns: dict[str, list[int]] = {}
    for request in requests:
        assert request.prefix_group == request.session
        assert request.prefix_tokens == request.prompt_tokens - 1
        turns.setdefault(request.session, []).append(request.prompt_tokens)
    multi = [prompts for prompts in turns.values() if len(prompts) > 1]
    assert multi, "some sessions have several turns"
    assert all(prompts == sorted(prompts) for prompts in multi)


def test_unknown_workload_is_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown workload 'nope'.*mixed"):
        generate("nope", random.Random(1), 1.0, 1.0)


def test_a_written_trace_reads_back_unchanged(tmp_path: Path) -> None:
    requests = list(generate("mixed", random.Random(2), 30.0, 20.0))
    path = tmp_path / "trace.jsonl"
    assert write_trace(path, requests) == len(requests)
    assert read_trace(path) == requests


def test_a_trace_may_give_prompts_as_text() -> None:
    lines = [
        '{"arrival_s": 0.5, "prompt": "abcdefgh", "output_tokens": 4}',
        "",
        '{"arrival_s": 1, "prompt": "0123456789abcdef", "prefix": "01234567",'
        ' "prefix_group": "sys", "output_tokens": 2, "slo_class": "latency", "tenant": "acme"}',
    ]
    first, second = parse_trace(lines)
    assert (first.request_id, first.prompt_tokens, first.prefix_tokens) == ("t1", 2, 0)
    assert (second.prompt_tokens, second.prefix_tokens, second.prefix_group) == (4, 2, "sys")
    assert (second.slo_class, second.tenant) == ("latency", "acme")


_GOOD = {"arrival_s": 2, "prompt_tokens": 3, "output_tokens": 1}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", r"t\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"t\.jsonl:2: expected a JSON object"),
        (json.dumps({**_GOOD, "arrival_s": None}), r":2: field 'arrival_s'"),
        (json.dumps({"prompt_tokens": 3, "output_tokens": 1}), r":2: missing field 'arrival_s'"),
        (json.dumps({"arrival_s": 2, "output_tokens": 1}), r":2: missing field 'prompt_tokens'"),
        (json.dumps({**_GOOD, "output_tokens": "x"}), r":2: field 'output_tokens'"),
        (json.dumps({**_GOOD, "arrival_s": -1}), r":2: field 'arrival_s'"),
        (json.dumps({**_GOOD, "arrival_s": 0.5}), r":2: field 'arrival_s'.*>= the previous"),
        (json.dumps({**_GOOD, "slo_class": "gold"}), r":2: field 'slo_class'"),
        (json.dumps({**_GOOD, "prefix_tokens": 9, "prefix_group": "g"}), r"'prefix_tokens'"),
        (json.dumps({**_GOOD, "prefix_tokens": 2}), r":2: field 'prefix_group'"),
        (json.dumps({**_GOOD, "colour": "red"}), r":2: unknown field 'colour'"),
    ],
)
def test_a_bad_trace_line_is_named_with_its_field(line: str, message: str) -> None:
    lines = ['{"arrival_s": 1.0, "prompt_tokens": 3, "output_tokens": 1}', line]
    with pytest.raises(TraceError, match=message):
        list(parse_trace(lines, source="t.jsonl"))


def test_a_missing_trace_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match=r"missing\.jsonl: cannot read"):
        read_trace(tmp_path / "missing.jsonl")

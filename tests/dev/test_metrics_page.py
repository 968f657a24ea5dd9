"""The emulator's /metrics page, parsed with prometheus_client: vLLM's names, labels and values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.dev.metrics_page import buckets_1_2_5
from infermesh.dev.profiles import DEFAULT_MODEL, GpuProfile
from infermesh.dev.vllm_emulator import EmulatorServer

pytestmark = pytest.mark.anyio

StartEmulator = Callable[..., Awaitable[EmulatorServer]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

LABELS = (("engine", "0"), ("model_name", DEFAULT_MODEL))
SHARED_SYSTEM_PROMPT = "You are the assistant of a payments platform. " * 20


async def scrape(session: aiohttp.ClientSession, server: EmulatorServer) -> tuple[str, str]:
    async with session.get(f"{server.url}/metrics") as resp:
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.text()


def samples(page: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(page)
        for sample in family.samples
    }


async def chat(session: aiohttp.ClientSession, server: EmulatorServer, question: str) -> int:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "system", "content": SHARED_SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ],
        "max_tokens": 5,
    }
    async with session.post(f"{server.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        return int((await resp.json())["usage"]["prompt_tokens"])


async def test_page_uses_vllm_names_labels_and_content_type(start: StartEmulator) -> None:
    server = await start()
    async with aiohttp.ClientSession() as session:
        content_type, page = await scrape(session, server)

    assert content_type == "text/plain; version=1.0.0; charset=utf-8"
    families = {family.name: family for family in text_string_to_metric_families(page)}
    expected_types = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prompt_tokens": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    assert {name: families[name].type for name in expected_types} == expected_types
    # The deprecated pre-0.12 names are gone, as in vLLM >= 0.12.
    assert "vllm:gpu_cache_usage_perc" not in families
    assert "vllm:time_per_output_token_seconds" not in families
    # Counters carry _total on the wire; every vLLM series carries model_name and engine.
    names = {s.name for family in families.values() for s in family.samples}
    assert "vllm:prompt_tokens_total" in names
    assert "vllm:request_success_total" in names
    running = families["vllm:num_requests_running"].samples[0]
    assert running.labels == {"model_name": DEFAULT_MODEL, "engine": "0"}
    reasons = {
        s.labels["finished_reason"]
        for s in families["vllm:request_success"].samples
        if s.name.endswith("_total")
    }
    assert reasons == {"stop", "length", "abort", "error", "repetition"}


async def test_cache_config_info_describes_the_kv_cache(start: StartEmulator) -> None:
    server = await start(num_gpu_blocks=777)
    async with aiohttp.ClientSession() as session:
        _, page = await scrape(session, server)
    (info,) = [
        s
        for f in text_string_to_metric_families(page)
        if f.name == "vllm:cache_config_info"
        for s in f.samples
    ]
    assert info.value == 1
    assert info.labels["num_gpu_blocks"] == "777"
    assert info.labels["block_size"] == "16"
    assert info.labels["enable_prefix_caching"] == "True"
    assert info.labels["engine"] == "0"


async def test_counters_and_histograms_move_with_traffic(start: StartEmulator) -> None:
    server = await start()
    async with aiohttp.ClientSession() as session:
        _, before = await scrape(session, server)
        prompt_tokens = await chat(session, server, "What is the refund window?")
        prompt_tokens += await chat(session, server, "How are chargebacks handled?")
        _, after = await scrape(session, server)

    old, new = samples(before), samples(after)
    assert old[("vllm:prompt_tokens_total", LABELS)] == 0
    assert new[("vllm:prompt_tokens_total", LABELS)] == prompt_tokens
    assert new[("vllm:generation_tokens_total", LABELS)] == 10
    length = tuple(sorted((*LABELS, ("finished_reason", "length"))))
    assert new[("vllm:request_success_total", length)] == 2
    assert new[("vllm:time_to_first_token_seconds_count", LABELS)] == 2
    assert new[("vllm:e2e_request_latency_seconds_count", LABELS)] == 2
    assert new[("vllm:inter_token_latency_seconds_count", LABELS)] == 8
    assert new[("vllm:prefix_cache_queries_total", LABELS)] == prompt_tokens
    # The second request reuses the shared system prompt's full blocks.
    assert new[("vllm:prefix_cache_hits_total", LABELS)] >= 16 * 10
    assert new[("vllm:num_requests_running", LABELS)] == 0


async def test_gauges_show_requests_in_flight(
    start: StartEmulator, slow_profile: GpuProfile
) -> None:
    server = await start(profile=slow_profile, max_num_seqs=1)
    body = {"model": DEFAULT_MODEL, "prompt": "Tell me a story", "max_tokens": 100, "stream": True}
    async with aiohttp.ClientSession() as session:
        first = await session.post(f"{server.url}/v1/completions", json=body)
        second = await session.post(f"{server.url}/v1/completions", json=body)
        try:
            await first.content.readline()  # the first request is decoding
            deadline = time.monotonic() + 10
            while True:
                _, page = await scrape(session, server)
                values = samples(page)
                running = values[("vllm:num_requests_running", LABELS)]
                waiting = values[("vllm:num_requests_waiting", LABELS)]
                if (running, waiting) == (1, 1):
                    break
                assert time.monotonic() < deadline, f"running={running} waiting={waiting}"
                await asyncio.sleep(0.02)
            assert values[("vllm:kv_cache_usage_perc", LABELS)] > 0
        finally:
            first.close()
            second.close()


def test_token_count_buckets_follow_vllms_1_2_5_series() -> None:
    assert buckets_1_2_5(100) == (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)

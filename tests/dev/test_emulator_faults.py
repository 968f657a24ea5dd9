"""The emulator's stall and fault injection (for hedging and retry tests) and its counters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.dev.profiles import DEFAULT_MODEL
from infermesh.dev.vllm_emulator import EmulatorConfig, EmulatorServer

from .conftest import FAST

pytestmark = pytest.mark.anyio

StartEmulator = Callable[..., Awaitable[EmulatorServer]]
BODY = {"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2, "stream": True}


async def counters(http: httpx2.AsyncClient, url: str) -> dict[str, float]:
    page = (await http.get(f"{url}/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name.startswith("infermesh_emulator_")
    }


async def wait_for_count(
    http: httpx2.AsyncClient, url: str, name: str, value: float, timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while (await counters(http, url)).get(name, 0.0) < value:
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not reach {value}")
        await asyncio.sleep(0.02)


async def test_injected_failures_answer_the_status_before_any_body(start: StartEmulator) -> None:
    server = await start(profile=FAST, fail_prob=1.0, fail_status=429)
    async with httpx2.AsyncClient(verify=False) as http:
        response = await http.post(f"{server.url}/v1/completions", json=BODY)
        assert response.status_code == 429
        assert response.json()["error"]["message"] == "injected fault"
        seen = await counters(http, server.url)
    assert seen["infermesh_emulator_faults_total"] == 1
    assert seen["infermesh_emulator_requests_total"] == 1


async def test_a_stalled_request_abandoned_by_its_client_is_counted_as_cancelled(
    start: StartEmulator,
) -> None:
    server = await start(profile=FAST, stall_prob=1.0, stall_s=60.0)
    async with httpx2.AsyncClient(verify=False) as http:
        request = asyncio.ensure_future(http.post(f"{server.url}/v1/completions", json=BODY))
        await wait_for_count(http, server.url, "infermesh_emulator_stalls_total", 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await wait_for_count(http, server.url, "infermesh_emulator_cancelled_total", 1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("stall_prob", 1.5, "stall_prob must be in"),
        ("fail_status", 404, "fail_status must be 429 or a 5xx"),
        ("stall_s", -1.0, "stall_s must be >= 0"),
    ],
)
def test_bad_fault_options_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmulatorConfig(**{field: value})  # type: ignore[arg-type]

"""The vLLM emulator's dev-only `POST /dev/speed`: a throttled GPU is a slower replica."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from infermesh.dev.profiles import DEFAULT_MODEL, get_profile
from infermesh.dev.vllm_emulator import EmulatorServer

pytestmark = pytest.mark.anyio

StartEmulator = Callable[..., Awaitable[EmulatorServer]]


async def _mean_itl_s(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        page = await response.text()
    values = {}
    for line in page.splitlines():
        for suffix in ("_sum", "_count"):
            name = f"vllm:inter_token_latency_seconds{suffix}"
            if line.startswith(name):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values["_sum"] / values["_count"]


async def test_a_lower_speed_factor_makes_every_step_longer(start: StartEmulator) -> None:
    # The FAST test profile's steps last 1 ms; at a tenth of the speed each lasts 10 ms, so
    # every inter-token gap is at least that (a busy machine only makes it longer).
    server = await start()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/dev/speed", json={"factor": 0.1}) as response:
            assert response.status == 200
            assert await response.json() == {"factor": 0.1, "previous": 1.0}
        body = {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 8, "ignore_eos": True}
        async with session.post(f"{server.url}/v1/completions", json=body) as response:
            assert response.status == 200
        assert await _mean_itl_s(session, server.url) >= 0.010


@pytest.mark.parametrize(
    "body", [{"factor": 0}, {"factor": 1.5}, {"factor": "fast"}, {"factor": True}, [], {}]
)
async def test_a_bad_factor_is_refused_with_what_is_expected(
    start: StartEmulator, body: object
) -> None:
    server = await start()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/dev/speed", json=body) as response,
    ):
        assert response.status == 400
        assert "0 < F <= 1" in (await response.json())["error"]


async def test_an_instant_profile_has_no_speed_to_change(start: StartEmulator) -> None:
    server = await start(profile=get_profile("instant"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/dev/speed", json={"factor": 0.5}) as response,
    ):
        assert response.status == 409
        assert "answers instantly" in (await response.json())["error"]

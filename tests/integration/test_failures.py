"""When runtimes fail: 502 before the first byte, 503 + Retry-After, and death mid-stream."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from infermesh.dev.harness import LocalMesh, ManagedProcess, ReplicaSpec

from .conftest import MODEL, spec, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def emulator(mesh: LocalMesh, name: str) -> ManagedProcess:
    return next(p for p in mesh.processes if p.name == f"emulator {name}")


def kill(process: ManagedProcess) -> None:
    assert process.process is not None
    process.process.send_signal(signal.SIGKILL)


async def post_chat(mesh: LocalMesh) -> tuple[int, dict[str, str], dict[str, object]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{mesh.router_url}/v1/chat/completions", json=CHAT) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.json()


async def agent_counter(mesh: LocalMesh, sample: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(mesh.agent_metrics_url) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
async def slow_poll_mesh() -> AsyncIterator[LocalMesh]:
    """One replica whose agent polls rarely, so a dead runtime still looks healthy for a while."""
    async with LocalMesh(
        spec(
            ReplicaSpec("h100", "only"),
            poll_interval_s=8.0,
            extra_config="[scoring]\nstale_after_s = 60.0",
        )
    ) as running:
        yield running


async def test_dead_runtime_gives_502_then_503_with_retry_after(
    slow_poll_mesh: LocalMesh,
) -> None:
    status, _, _ = await post_chat(slow_poll_mesh)
    assert status == 200
    kill(emulator(slow_poll_mesh, "only"))

    # The agent has not polled since: the router tries the runtime and fails before any byte.
    status, _, body = await post_chat(slow_poll_mesh)
    assert status == 502
    assert isinstance(body["error"], dict)
    assert body["error"]["message"]

    # Once the agent's next poll marks the runtime unhealthy there is no target at all.
    last: list[tuple[int, dict[str, str]]] = []

    async def no_target() -> bool:
        code, headers, _ = await post_chat(slow_poll_mesh)
        last[:] = [(code, headers)]
        return code == 503

    await wait_for(no_target, "503 once the agent sees the runtime is down", timeout_s=30)
    headers = last[0][1]
    assert float(headers["Retry-After"]) > 0


@pytest.fixture
async def streaming_mesh() -> AsyncIterator[LocalMesh]:
    async with LocalMesh(spec(ReplicaSpec("a10", "streamer"))) as running:
        yield running


async def test_runtime_dying_mid_stream_ends_the_stream_with_an_error(
    streaming_mesh: LocalMesh,
) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{streaming_mesh.router_url}/v1", api_key="unused", max_retries=0
    ) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "tell me a long story"}],
            max_tokens=2000,
            stream=True,
        )
        received = 0

        async def consume() -> None:
            nonlocal received
            async for _chunk in stream:
                received += 1
                if received == 3:
                    kill(emulator(streaming_mesh, "streamer"))

        with pytest.raises(openai.APIError) as info:
            await consume()
    assert received >= 3
    assert "runtime failed while streaming" in str(info.value)

    async def failure_reported() -> bool:
        sample = 'infermesh_agent_outcomes_total{result="target_error"}'
        return await agent_counter(streaming_mesh, sample) >= 1

    await wait_for(failure_reported, "the router to report the failed outcome to the agent")

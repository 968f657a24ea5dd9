"""Integration fixtures: real meshes (emulated vLLM servers, agent, router) on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from infermesh.dev.harness import LocalMesh, MeshSpec, ReplicaSpec

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def spec(*replicas: ReplicaSpec, **kwargs: object) -> MeshSpec:
    """A mesh spec with test-friendly defaults (fast polling, generous start-up deadline)."""
    options: dict[str, object] = {
        "poll_interval_s": 0.2,
        "ready_timeout_s": 90.0,
        "log_level": "info",
    }
    options.update(kwargs)
    return MeshSpec(replicas=tuple(replicas), model=MODEL, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
async def mesh() -> AsyncIterator[LocalMesh]:
    """Two emulated replicas of different speeds behind one agent and router."""
    async with LocalMesh(spec(ReplicaSpec("h100", "fast"), ReplicaSpec("a10", "slow"))) as running:
        yield running


async def wait_for(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0
) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def agent_gauge(mesh: LocalMesh, name: str, endpoint: str) -> float | None:
    """One per-target gauge from the agent's /metrics, by runtime endpoint."""
    async with aiohttp.ClientSession() as session, session.get(mesh.agent_metrics_url) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + "{") and f'endpoint="{endpoint}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None

"""Routing on live telemetry: saturated replicas get less new work; shared prefixes stick."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator

import openai
import pytest

from infermesh.dev.harness import LocalMesh, ReplicaSpec
from infermesh.dev.loadgen import replica_tag_of

from .conftest import MODEL, agent_gauge, spec, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NAMES = ("r0", "r1", "r2")


@pytest.fixture(scope="module")
async def trio_mesh() -> AsyncIterator[LocalMesh]:
    """Three identical replicas with small batches, so one is easy to saturate."""
    replicas = [ReplicaSpec("a10", name, extra_args=("--max-num-seqs", "4")) for name in NAMES]
    async with LocalMesh(spec(*replicas)) as running:
        yield running


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


async def ask(oai: openai.AsyncOpenAI, system: str, question: str, max_tokens: int = 4) -> str:
    """Send one chat request; return the name of the replica that answered."""
    reply = await oai.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
    )
    return replica_tag_of(reply.id)


async def test_saturated_replica_receives_fewer_new_requests(trio_mesh: LocalMesh) -> None:
    busy = trio_mesh.replicas[0]
    async with client(busy.url) as direct, client(trio_mesh.router_url) as routed:
        # Saturate r0 behind the router's back: far more long requests than its batch holds.
        backlog = [
            asyncio.create_task(ask(direct, f"backlog {i}", "write a long essay", max_tokens=400))
            for i in range(16)
        ]

        async def agent_sees_queue() -> bool:
            waiting = await agent_gauge(trio_mesh, "infermesh_agent_target_waiting", busy.url)
            return waiting is not None and waiting >= 4

        await wait_for(agent_sees_queue, "the agent to see r0's queue")
        landed = collections.Counter(
            await asyncio.gather(*(ask(routed, f"tenant {i}", f"question {i}") for i in range(18)))
        )
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)
    idle = [landed[name] for name in NAMES[1:]]
    assert landed[busy.name] < min(idle), f"requests per replica: {dict(landed)}"


async def test_shared_prefix_sticks_to_one_replica_until_it_is_loaded(
    trio_mesh: LocalMesh,
) -> None:
    system = "You are the assistant of a shipping company. " * 40  # a long shared prefix
    async with client(trio_mesh.router_url) as routed:

        async def mesh_idle() -> bool:
            for replica in trio_mesh.replicas:
                running = await agent_gauge(
                    trio_mesh, "infermesh_agent_target_running", replica.url
                )
                waiting = await agent_gauge(
                    trio_mesh, "infermesh_agent_target_waiting", replica.url
                )
                if (running or 0) + (waiting or 0) > 0:
                    return False
            return True

        await wait_for(mesh_idle, "the mesh to drain", timeout_s=60)
        # One at a time: the prefix's home replica is never loaded, so every request lands there.
        sequential = [await ask(routed, system, f"parcel {i}") for i in range(8)]
        assert len(set(sequential)) == 1, f"sequential requests spread over {sequential}"
        home = sequential[0]
        # A burst far above one replica's share: the home fills up and the rest spill over.
        burst = collections.Counter(
            await asyncio.gather(
                *(ask(routed, system, f"burst {i}", max_tokens=64) for i in range(24))
            )
        )
    assert len(burst) >= 2, f"a loaded home replica must spill over: {dict(burst)}"
    assert burst[home] == max(burst.values()), f"home {home} should keep the most: {dict(burst)}"

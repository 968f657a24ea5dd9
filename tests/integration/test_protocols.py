"""Ingress protocols against real processes: HTTP/2 (h2c), embeddings with the openai client,
WebSocket streaming and cancellation, and graceful drain of a real router on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import openai
import orjson
import pytest
from websockets.asyncio.client import connect

from infermesh.dev.harness import LocalMesh, ManagedProcess, ReplicaSpec

from .conftest import MODEL, spec, wait_for

pytestmark = pytest.mark.anyio

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
LONG = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "tell me a long story"}],
    "max_tokens": 1500,
}
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
async def h2_mesh() -> AsyncIterator[LocalMesh]:
    """One slow emulated replica behind a router served by hypercorn (HTTP/1.1 + HTTP/2)."""
    mesh_spec = spec(ReplicaSpec("a10", "r1"), env=(("INFERMESH_ROUTER__SERVER", "hypercorn"),))
    async with LocalMesh(mesh_spec) as running:
        yield running


async def _aborted(mesh: LocalMesh) -> float:
    """Requests the emulator finished as aborted (the client went away)."""
    total = 0.0
    async with aiohttp.ClientSession() as session:
        for replica in mesh.replicas:
            async with session.get(f"{replica.url}/metrics") as response:
                text = await response.text()
            for line in text.splitlines():
                if line.startswith("vllm:request_success_total{") and (
                    'finished_reason="abort"' in line
                ):
                    total += float(line.rsplit(" ", 1)[1])
    return total


async def test_http2_prior_knowledge_streams_through_a_real_router(h2_mesh: LocalMesh) -> None:
    async with httpx2.AsyncClient(
        base_url=h2_mesh.router_url, http1=False, http2=True, timeout=TIMEOUT_S
    ) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert (response.status_code, response.http_version) == (200, "HTTP/2")
        assert response.json()["choices"][0]["message"]["content"]
        chunks = 0
        body = {**CHAT, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.http_version == "HTTP/2"
            lines = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
        chunks = sum(1 for line in lines if line.startswith("data: {"))
        assert chunks >= 2
        assert lines[-1] == "data: [DONE]"


async def test_embeddings_with_the_openai_client(h2_mesh: LocalMesh) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"{h2_mesh.router_url}/v1", api_key="unused", max_retries=0
    ) as client:
        first = await client.embeddings.create(model=MODEL, input=["a cat", "a dog"])
        again = await client.embeddings.create(model=MODEL, input="a cat")
        floats = await client.embeddings.create(
            model=MODEL, input="a cat", encoding_format="float", dimensions=8
        )
        with pytest.raises(openai.BadRequestError) as refused:
            await client.embeddings.create(model=MODEL, input=[])
    assert [item.index for item in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 64
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert sum(v * v for v in first.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert len(floats.data[0].embedding) == 8
    assert first.usage.prompt_tokens > 0
    assert refused.value.body is not None
    assert "'input'" in str(refused.value)


async def test_websocket_streams_a_chat_and_close_aborts_upstream(h2_mesh: LocalMesh) -> None:
    ws_url = h2_mesh.router_url.replace("http://", "ws://") + "/v1/ws/chat/completions"
    async with connect(ws_url) as ws:
        await ws.send(orjson.dumps(CHAT).decode())
        messages: list[dict[str, Any]] = []
        async with asyncio.timeout(TIMEOUT_S):
            while not messages or messages[-1].get("type") not in ("done", "error"):
                messages.append(orjson.loads(await ws.recv()))
    assert messages[-1]["type"] == "done"
    text = "".join(
        m["choices"][0]["delta"].get("content") or "" for m in messages[:-1] if m.get("choices")
    )
    assert text

    before = await _aborted(h2_mesh)
    async with connect(ws_url) as ws:
        await ws.send(orjson.dumps(LONG).decode())
        async with asyncio.timeout(TIMEOUT_S):
            for _ in range(3):
                chunk = orjson.loads(await ws.recv())
                assert chunk.get("type") not in ("done", "error"), chunk

    async def aborted() -> bool:
        return await _aborted(h2_mesh) > before

    await wait_for(aborted, "the emulator to see the request aborted", TIMEOUT_S)


@pytest.fixture(params=["uvicorn", "hypercorn"])
async def draining_mesh(request: pytest.FixtureRequest) -> AsyncIterator[LocalMesh]:
    env = (
        ("INFERMESH_ROUTER__HTTP__DRAIN_TIMEOUT_S", "60"),
        ("INFERMESH_ROUTER__SERVER", request.param),
    )
    async with LocalMesh(spec(ReplicaSpec("a10", "r1"), env=env)) as running:
        yield running


def _router(mesh: LocalMesh) -> ManagedProcess:
    return next(p for p in mesh.processes if p.name == "router")


async def test_sigterm_drains_a_running_stream_then_exits(draining_mesh: LocalMesh) -> None:
    router = _router(draining_mesh)
    assert router.process is not None
    body = {**LONG, "max_tokens": 200, "stream": True}
    async with httpx2.AsyncClient(base_url=draining_mesh.router_url, timeout=TIMEOUT_S) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            first = await anext(lines)
            assert first.startswith("data: {")
            router.process.send_signal(signal.SIGTERM)

            async def refuses_new_connections() -> bool:
                try:
                    async with httpx2.AsyncClient(timeout=2.0) as fresh:
                        await fresh.get(f"{draining_mesh.router_url}/health")
                except httpx2.TransportError:
                    return True
                return False

            await wait_for(refuses_new_connections, "the router to stop accepting", TIMEOUT_S)
            rest = [line async for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]", "the stream in flight finished"
        assert not any('"error"' in line for line in rest)
    async with asyncio.timeout(TIMEOUT_S):
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert await router.process.wait() in (0, -signal.SIGTERM)

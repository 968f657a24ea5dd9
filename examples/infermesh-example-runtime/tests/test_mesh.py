"""A real agent and router with the plugin installed route chat requests to llama-server."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import aiohttp
import pytest

from infermesh.dev.pytest_plugin import StartMesh

pytestmark = pytest.mark.anyio


class LlamaServer(Protocol):
    """What this test uses of conftest's emulated llama-server (the `llama_server` fixture)."""

    alias: str
    url: str
    served: int


async def listed_models(session: aiohttp.ClientSession, router_url: str) -> list[str]:
    async with session.get(f"{router_url}/v1/models") as reply:
        return [card["id"] for card in (await reply.json())["data"]]


async def test_the_router_sends_the_llama_model_to_llama_server(
    llama_server: LlamaServer, infermesh_start_router: StartMesh
) -> None:
    mesh = await infermesh_start_router(
        extra_config=(
            "[[runtimes]]\n"
            'kind = "llamacpp"\n'
            'name = "llama"\n'
            f'url = "{llama_server.url}"\n'
            "poll_interval_s = 0.2\n"
        )
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        deadline = time.monotonic() + 30
        while llama_server.alias not in await listed_models(session, mesh.router_url):
            assert time.monotonic() < deadline, "the router never listed the llama.cpp model"
            await asyncio.sleep(0.1)
        body = {"model": llama_server.alias, "messages": [{"role": "user", "content": "hi"}]}
        async with session.post(f"{mesh.router_url}/v1/chat/completions", json=body) as reply:
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
    assert answer["id"].startswith("chatcmpl-llamacpp-")
    assert answer["choices"][0]["message"]["content"] == "hello from llama-server"
    assert llama_server.served == 1

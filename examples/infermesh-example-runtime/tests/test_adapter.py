"""The adapter against an emulated llama-server on loopback, found through its entry point."""

from __future__ import annotations

import asyncio
from typing import Protocol

import aiohttp
import anyio
import pytest

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext, RuntimeAdapter
from infermesh.core.model import ModelState, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh.dev.fake_clock import FakeClock
from infermesh_example_runtime.adapter import LlamaCppAdapter

pytestmark = pytest.mark.anyio


class LlamaServer(Protocol):
    """What these tests use of conftest's emulated llama-server (the `llama_server` fixture)."""

    alias: str
    url: str
    loading: bool
    release: asyncio.Event


def context(url: str, **options: object) -> AdapterContext:
    return AdapterContext(
        node="n1", name="llama", url=url, poll_interval_s=0.05, timeout_s=1.0, options=options
    )


def test_the_installed_plugin_registers_kind_llamacpp() -> None:
    host = PluginHost.load(allow=["example-runtime"], strict=True)
    adapter = host.runtime_adapters()["llamacpp"](context("http://127.0.0.1:8080"))
    assert isinstance(adapter, RuntimeAdapter)
    assert host.origins["example-runtime"] == (
        "infermesh_example_runtime.plugin (infermesh-example-runtime 0.1.0)"
    )


def test_bad_options_are_refused_naming_the_runtime() -> None:
    with pytest.raises(ConfigError, match=r"runtime 'llama' \(kind llamacpp\): unknown option"):
        LlamaCppAdapter(context("http://127.0.0.1:8080", modle="x"))
    with pytest.raises(ConfigError, match=r"options\.model must be a str, got int"):
        LlamaCppAdapter(context("http://127.0.0.1:8080", model=3))


async def test_busy_slots_and_deferred_requests_reach_the_model_state(
    llama_server: LlamaServer, infermesh_clock: FakeClock
) -> None:
    llama_server.release.clear()  # completions hold their slots
    adapter = LlamaCppAdapter(context(llama_server.url + "/v1"), clock=infermesh_clock)
    key = TargetKey(model=llama_server.alias, node="n1", endpoint=llama_server.url)
    state = ModelState(key=key)
    body = {"model": llama_server.alias, "messages": [{"role": "user", "content": "hi"}]}

    async def chat(session: aiohttp.ClientSession) -> None:
        async with session.post(llama_server.url + "/v1/chat/completions", json=body) as reply:
            assert reply.status == 200

    async with aiohttp.ClientSession() as session, anyio.create_task_group() as group:
        for _ in range(3):  # two slots: two run, one is deferred
            group.start_soon(chat, session)
        with anyio.fail_after(30):
            async for delta in adapter.deltas():
                state = state.apply(delta)
                if (state.running, state.waiting) == (2.0, 1.0):
                    break
        llama_server.release.set()
    await adapter.aclose()
    assert state.healthy
    assert state.max_num_seqs == 2
    assert state.kv_cache_usage == 0.5
    assert state.last_updated == infermesh_clock.now  # stamped by the fake clock


async def test_a_loading_server_is_unhealthy_until_it_is_ready(
    llama_server: LlamaServer, infermesh_clock: FakeClock
) -> None:
    adapter = LlamaCppAdapter(context(llama_server.url), clock=infermesh_clock)
    key = TargetKey(model=llama_server.alias, node="n1", endpoint=llama_server.url)
    state = ModelState(key=key)
    seen_loading = False
    with anyio.fail_after(30):
        async for delta in adapter.deltas():
            state = state.apply(delta)
            if state.healthy and not seen_loading:
                llama_server.loading = True
            elif not state.healthy:
                seen_loading = True
                assert "HTTP 503" in state.health_reason
                assert "Loading model" in state.health_reason
                llama_server.loading = False
            elif seen_loading:
                break
    await adapter.aclose()
    assert state.healthy

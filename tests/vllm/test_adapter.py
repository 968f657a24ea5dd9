"""The vLLM adapter against a real HTTP server on loopback: polling, outages, control calls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import structlog.testing

from infermesh.core.contracts import AdapterContext
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.vllm.adapter import THREAD_PARSE_CHARS, VllmAdapter
from infermesh.vllm.control import VllmControlError
from tests.vllm.pages import MODEL, EngineLoad, render_page
from tests.vllm.server import running_server

pytestmark = pytest.mark.anyio


class Watcher:
    """Consumes an adapter's deltas in the background into the states an agent would hold."""

    def __init__(self, adapter: VllmAdapter) -> None:
        self.adapter = adapter
        self.deltas: list[ModelStateDelta] = []
        self.states: dict[TargetKey, ModelState] = {}

    async def run(self) -> None:
        async for delta in self.adapter.deltas():
            self.deltas.append(delta)
            self.states[delta.key] = self.states.get(delta.key, ModelState(key=delta.key)).apply(
                delta
            )

    def state(self, model: str = MODEL) -> ModelState | None:
        return self.states.get(TargetKey(model=model, node="n1", endpoint=self.adapter.base_url))


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    # The adapter has no event for "state became X": poll the condition, bounded by a deadline.
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def make_adapter(
    url: str, options: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> VllmAdapter:
    context = AdapterContext(
        node="n1",
        name="local",
        url=url,
        poll_interval_s=0.05,
        timeout_s=0.5,
        options=dict(options or {}),
    )
    return VllmAdapter(context, environ=environ or {})


@asynccontextmanager
async def watching(adapter: VllmAdapter) -> AsyncIterator[Watcher]:
    watcher = Watcher(adapter)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            yield watcher
            group.cancel_scope.cancel()
    finally:
        await adapter.aclose()


def error_events(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "error"]


async def test_polls_all_three_endpoints_and_streams_the_models_state() -> None:
    async with running_server() as server, watching(make_adapter(server.url + "/")) as watcher:
        await wait_for(lambda: watcher.state() is not None)
        state = watcher.state()
        assert state is not None
        assert (state.running, state.waiting, state.kv_cache_usage, state.healthy) == (
            3.0,
            2.0,
            0.375,
            True,
        )
        assert state.key.endpoint == server.url
        paths = {path for _, path, _, _ in server.requests}
        assert {"/metrics", "/v1/models", "/health"} <= paths
        accepts = {h.get("Accept") for _, path, h, _ in server.requests if path == "/metrics"}
        assert accepts == {"text/plain;version=0.0.4"}

        server.metrics_text = render_page(engines=(EngineLoad(running=7),))
        await wait_for(lambda: (s := watcher.state()) is not None and s.running == 7.0)
        versions = [d.version for d in watcher.deltas]
        assert versions == sorted(set(versions))


async def test_a_runtime_that_goes_down_is_logged_once_and_comes_back_healthy() -> None:
    async with running_server() as server:
        adapter = make_adapter(server.url)
        with structlog.testing.capture_logs() as logs:
            async with watching(adapter) as watcher:
                await wait_for(lambda: (s := watcher.state()) is not None and s.healthy)
                await server.stop()
                await wait_for(lambda: (s := watcher.state()) is not None and not s.healthy)
                state = watcher.state()
                assert state is not None
                assert f"{server.url}/metrics" in state.health_reason
                polls = adapter.polls
                await wait_for(lambda: adapter.polls >= polls + 3)
                assert len(error_events(logs)) == 1
                assert error_events(logs)[0]["url"] == server.url

                await server.start()
                await wait_for(lambda: (s := watcher.state()) is not None and s.healthy)
        assert len(error_events(logs)) == 1
        assert [e["event"] for e in logs if e["log_level"] == "info"] == [
            "vLLM runtime usable again"
        ]


async def test_a_garbage_page_marks_the_target_unhealthy_without_ending_the_stream() -> None:
    async with running_server() as server:
        adapter = make_adapter(server.url)
        with structlog.testing.capture_logs() as logs:
            async with watching(adapter) as watcher:
                await wait_for(lambda: watcher.state() is not None)
                server.metrics_text = "<html><body>Bad Gateway</body></html>"
                await wait_for(lambda: (s := watcher.state()) is not None and not s.healthy)
                polls = adapter.polls
                await wait_for(lambda: adapter.polls >= polls + 3)
                server.metrics_text = render_page()
                await wait_for(lambda: (s := watcher.state()) is not None and s.healthy)
        errors = error_events(logs)
        assert len(errors) == 1
        assert f"cannot read {server.url}/metrics" in errors[0]["reason"]


async def test_a_runtime_that_never_answers_in_time_is_unhealthy() -> None:
    async with running_server() as server, watching(make_adapter(server.url)) as watcher:
        await wait_for(lambda: watcher.state() is not None)
        server.stall_paths.add("/metrics")
        await wait_for(lambda: (s := watcher.state()) is not None and not s.healthy)
        state = watcher.state()
        assert state is not None
        assert "within timeout_s=0.5" in state.health_reason


async def test_an_unreachable_runtime_from_the_start_yields_nothing_and_logs_once() -> None:
    async with running_server() as server:
        url = server.url
    adapter = make_adapter(url)
    with structlog.testing.capture_logs() as logs:
        async with watching(adapter) as watcher:
            await wait_for(lambda: adapter.polls >= 3)
    assert watcher.deltas == []
    assert len(error_events(logs)) == 1
    assert "is the vLLM server running" in error_events(logs)[0]["reason"]


@pytest.mark.parametrize(
    ("options", "environ"),
    [({"api_key": "s3cret"}, {}), ({"api_key_env": "VLLM_API_KEY"}, {"VLLM_API_KEY": "s3cret"})],
)
async def test_api_key_is_sent_as_a_bearer_token(
    options: dict[str, str], environ: dict[str, str]
) -> None:
    async with running_server() as server:
        async with watching(make_adapter(server.url, options, environ)) as watcher:
            await wait_for(lambda: watcher.state() is not None)
        auth = {h.get("Authorization") for _, path, h, _ in server.requests if path == "/v1/models"}
        assert auth == {"Bearer s3cret"}


async def test_load_unload_and_warm_call_vllm_and_the_next_poll_sees_the_adapter() -> None:
    async with running_server() as server:
        adapter = make_adapter(server.url)
        async with watching(adapter) as watcher:
            await wait_for(lambda: watcher.state() is not None)
            await adapter.load("sql-lora", "/adapters/sql")
            assert server.bodies("/v1/load_lora_adapter") == [
                {"lora_name": "sql-lora", "lora_path": "/adapters/sql"}
            ]
            await wait_for(lambda: (s := watcher.state("sql-lora")) is not None and s.loaded)
            await wait_for(
                lambda: (s := watcher.state()) is not None and s.adapters == ("sql-lora",)
            )

            await adapter.warm("sql-lora")
            [warm] = server.bodies("/v1/completions")
            assert (warm["model"], warm["max_tokens"]) == ("sql-lora", 1)

            await adapter.unload("sql-lora")
            await wait_for(lambda: (s := watcher.state("sql-lora")) is not None and not s.loaded)


async def test_control_errors_carry_vllms_message() -> None:
    async with running_server() as server:
        adapter = make_adapter(server.url)
        try:
            await adapter.load("sql-lora", "/adapters/sql")
            with pytest.raises(VllmControlError, match=r"HTTP 400: .*has already been loaded"):
                await adapter.load("sql-lora", "/adapters/sql")
            with pytest.raises(
                VllmControlError, match=r"unload LoRA adapter 'nope'.*cannot be found"
            ):
                await adapter.unload("nope")
            with pytest.raises(VllmControlError, match=r"warm model 'ghost'.*does not exist"):
                await adapter.warm("ghost")
            server.lora_routes = False
            with pytest.raises(VllmControlError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
                await adapter.load("chat-lora", "/adapters/chat")
        finally:
            await adapter.aclose()


async def test_control_of_an_unreachable_runtime_raises_a_clear_error() -> None:
    async with running_server() as server:
        url = server.url
    adapter = make_adapter(url)
    try:
        with pytest.raises(VllmControlError, match=f"vLLM at {url} could not load LoRA adapter"):
            await adapter.load("sql-lora", "/adapters/sql")
    finally:
        await adapter.aclose()


async def test_a_very_large_page_is_read_without_blocking_the_loop() -> None:
    async with running_server() as server:
        padding = "".join(f'http_requests_total{{handler="/h{i}"}} {i}\n' for i in range(20_000))
        server.metrics_text = padding + render_page(engines=(EngineLoad(running=9),))
        assert len(server.metrics_text) > THREAD_PARSE_CHARS
        async with watching(make_adapter(server.url)) as watcher:
            await wait_for(lambda: (s := watcher.state()) is not None and s.running == 9.0)

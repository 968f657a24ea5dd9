"""The Triton adapter against the emulated Triton over loopback: polling, control calls, outages,
options, and its registration through the plugin entry point."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import structlog.testing

from infermesh.core.config import ConfigError, RuntimeConfig
from infermesh.core.contracts import AdapterContext, RuntimeAdapter, RuntimeControl
from infermesh.core.model import ModelState, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh.dev.profiles import GpuProfile
from infermesh.dev.triton_emulator import (
    TritonEmulator,
    TritonEmulatorConfig,
    start_triton_emulator,
)
from infermesh.triton import adapter as adapter_module
from infermesh.triton.adapter import TritonAdapter, metrics_url_of
from infermesh.triton.control import TritonControlError

pytestmark = pytest.mark.anyio

FAST = GpuProfile(
    name="h100",
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.002,
    step_per_seq_s=0.0,
    num_gpu_blocks=1024,
    max_model_len=2048,
)
DEADLINE_S = 20.0


def context(url: str = "http://10.0.0.7:8000", **options: Any) -> AdapterContext:
    return AdapterContext(node="n1", name="triton0", url=url, options=options, poll_interval_s=0.1)


class Watcher:
    """Consumes an adapter's deltas in the background into the states an agent would hold."""

    def __init__(self, adapter: TritonAdapter) -> None:
        self.adapter = adapter
        self.states: dict[TargetKey, ModelState] = {}

    async def run(self) -> None:
        async for delta in self.adapter.deltas():
            old = self.states.get(delta.key, ModelState(key=delta.key))
            self.states[delta.key] = old.apply(delta)

    def state(self, model: str) -> ModelState | None:
        return self.states.get(TargetKey(model=model, node="n1", endpoint=self.adapter.base_url))

    async def until(self, what: str, check: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not check():
            assert time.monotonic() < deadline, f"never saw: {what}; states: {self.states}"
            await anyio.sleep(0.02)


def healthy(state: ModelState | None) -> bool:
    return state is not None and state.healthy


@asynccontextmanager
async def watching(emulator: TritonEmulator, **options: Any) -> AsyncIterator[Watcher]:
    options.setdefault("metrics_url", emulator.metrics_url)
    adapter = TritonAdapter(context(emulator.http_url, **options))
    watcher = Watcher(adapter)
    async with anyio.create_task_group() as group:
        group.start_soon(watcher.run)
        try:
            yield watcher
        finally:
            group.cancel_scope.cancel()
            await adapter.aclose()


@pytest.fixture
async def triton() -> AsyncIterator[TritonEmulator]:
    emulator = await start_triton_emulator(
        TritonEmulatorConfig(models=("simple",), profile=FAST, load_s=0.0)
    )
    yield emulator
    await emulator.aclose()


# --------------------------------------------------------------------------- polling


async def test_loaded_models_become_targets_with_tritons_figures(triton: TritonEmulator) -> None:
    async with watching(triton, grpc_url=triton.grpc_target) as watch:
        await watch.until("simple", lambda: watch.state("simple") is not None)
        state = watch.state("simple")
        assert state is not None
        assert state.loaded
        assert state.healthy
        assert state.labels.runtime == "triton"
        assert state.labels.gpu_uuid == triton.core.config.gpu_id()
        assert dict(state.labels.custom)["kserve_grpc"] == triton.grpc_target
        assert watch.state("simple_string") is None  # in the repository, never loaded
        await watch.adapter.warm("simple")
        await watch.until(
            "an e2e estimate", lambda: (watch.state("simple") or state).e2e_s is not None
        )
        estimate = watch.adapter.estimates[("simple", "1")]
        assert estimate.compute_s is not None
        assert estimate.compute_s >= 0.002  # the profile's execution time, in seconds
        reading = watch.adapter.reading
        assert reading is not None
        assert reading.gpus[triton.core.config.gpu_id()].memory_total_bytes == 80 * 1024**3


async def test_load_and_unload_through_runtime_control(triton: TritonEmulator) -> None:
    async with watching(triton) as watch:
        await watch.until("simple", lambda: watch.state("simple") is not None)
        await watch.adapter.load("identity_fp32", "repository")
        await watch.until(
            "identity_fp32 loaded",
            lambda: (s := watch.state("identity_fp32")) is not None and s.loaded and s.healthy,
        )
        await watch.adapter.warm("identity_fp32")  # zeros built from the metadata
        await watch.adapter.unload("simple")
        await watch.until(
            "simple unloaded", lambda: (s := watch.state("simple")) is not None and not s.loaded
        )
        state = watch.state("simple")
        assert state is not None
        assert "UNAVAILABLE (unloaded)" in state.health_reason
        await watch.adapter.load("simple", "")
        await watch.until(
            "simple back", lambda: (s := watch.state("simple")) is not None and s.loaded
        )


async def test_control_refusals_carry_tritons_message_and_status(triton: TritonEmulator) -> None:
    adapter = TritonAdapter(context(triton.http_url, metrics_url=triton.metrics_url))
    try:
        await adapter.load("simple", '{"max_batch_size": 8}')  # a configuration override
        with pytest.raises(TritonControlError, match=r"HTTP 400: failed to load 'resnet'"):
            await adapter.load("resnet", "repository")
        with pytest.raises(TritonControlError, match="Triton loads models from its own repository"):
            await adapter.load("simple", "/models/simple")
        with pytest.raises(TritonControlError, match="not valid JSON"):
            await adapter.load("simple", "{broken")
        with pytest.raises(TritonControlError, match=r"HTTP 503: .* has no available versions"):
            await adapter.warm("simple_string")  # never loaded
    finally:
        await adapter.aclose()


async def test_a_configured_warmup_request_is_sent_as_is(triton: TritonEmulator) -> None:
    request = {
        "inputs": [
            {"name": "INPUT0", "datatype": "INT32", "shape": [2, 16], "data": [1] * 32},
            {"name": "INPUT1", "datatype": "INT32", "shape": [2, 16], "data": [2] * 32},
        ]
    }
    adapter = TritonAdapter(
        context(triton.http_url, metrics_url=triton.metrics_url, warmup={"simple": request})
    )
    try:
        await adapter.warm("simple")
    finally:
        await adapter.aclose()
    assert triton.core.repository.stats_for("simple", "1").inference_count == 2


async def test_a_server_that_is_not_ready_makes_its_models_unhealthy(
    triton: TritonEmulator,
) -> None:
    async with watching(triton) as watch:
        await watch.until("simple", lambda: watch.state("simple") is not None)
        triton.core.ready = False
        await watch.until("unhealthy", lambda: not healthy(watch.state("simple")))
        state = watch.state("simple")
        assert state is not None
        assert "/v2/health/ready returned 400" in state.health_reason
        triton.core.ready = True
        await watch.until("healthy again", lambda: healthy(watch.state("simple")))


async def test_a_wrong_metrics_url_is_logged_once_with_what_to_check(
    triton: TritonEmulator,
) -> None:
    wrong = triton.http_url + "/metrics"  # the HTTP port, not the metrics port
    with structlog.testing.capture_logs() as logs:
        async with watching(triton, metrics_url=wrong) as watch:
            await watch.until("three polls", lambda: watch.adapter.polls >= 3)
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["reason"].startswith(f"{wrong} returned HTTP 404")
    assert "is options.metrics_url Triton's metrics endpoint (port 8002" in errors[0]["reason"]
    assert watch.states == {}  # no page was ever read, so there is no target to route to


async def test_a_server_that_goes_away_marks_its_targets_unhealthy() -> None:
    emulator = await start_triton_emulator(
        TritonEmulatorConfig(models=("simple",), profile=FAST, load_s=0.0)
    )
    closed = False
    try:
        async with watching(emulator) as watch:
            await watch.until("simple", lambda: watch.state("simple") is not None)
            await emulator.aclose()
            closed = True
            await watch.until("unhealthy", lambda: not healthy(watch.state("simple")))
            state = watch.state("simple")
            assert state is not None
            assert "cannot connect to" in state.health_reason
    finally:
        if not closed:
            await emulator.aclose()


# --------------------------------------------------------------------------- options, plugin


def test_the_triton_kind_is_registered_through_the_entry_point() -> None:
    host = PluginHost.load(allow=["triton"])
    assert host.failures == []
    adapter = host.runtime_adapters()["triton"](context())
    assert isinstance(adapter, RuntimeAdapter)
    assert isinstance(adapter, RuntimeControl)


def test_runtimes_of_kind_triton_use_the_kserve_transport() -> None:
    assert RuntimeConfig(kind="triton", url="http://h:8000").transport == "kserve-http"
    assert RuntimeConfig(kind="vllm", url="http://h:8000").transport == "openai-http"


@pytest.mark.parametrize(
    ("url", "metrics"),
    [
        ("http://10.0.0.7:8000", "http://10.0.0.7:8002/metrics"),
        ("http://[::1]:8000/v2/", "http://[::1]:8002/metrics"),
    ],
)
def test_the_metrics_url_defaults_to_port_8002(url: str, metrics: str) -> None:
    assert TritonAdapter(context(url)).metrics_url == metrics
    assert metrics_url_of(TritonAdapter(context(url)).base_url) == metrics


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("10.0.0.7:8000", {}, "must be an http:// or https:// base URL"),
        ("http://h:8000", {"metric_url": "x"}, "unknown option(s) metric_url"),
        ("http://h:8000", {"metrics_url": "h:8002"}, "options.metrics_url 'h:8002' must be"),
        ("http://h:8000", {"grpc_url": "h"}, "options.grpc_url 'h' must be host:port"),
        ("http://h:8000", {"control_timeout_s": 0}, "control_timeout_s must be a number > 0"),
        ("http://h:8000", {"warmup": {"simple": "{nope"}}, "warmup.simple is not valid JSON"),
        ("http://h:8000", {"warmup": {"simple": {"x": 1}}}, 'with an "inputs" list'),
    ],
)
def test_bad_options_are_config_errors_naming_the_runtime(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match="runtime 'triton0' \\(kind triton\\)") as error:
        TritonAdapter(context(url, **options))
    assert message in str(error.value)


async def test_large_pages_are_read_off_the_event_loop(
    triton: TritonEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapter_module, "THREAD_PARSE_CHARS", 0)  # every page counts as large
    async with watching(triton) as watch:
        await watch.until("simple", lambda: healthy(watch.state("simple")))

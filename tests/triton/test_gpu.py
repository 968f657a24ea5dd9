"""`[[gpus]] kind = "triton"`: GPU states from Triton's nv_gpu_* gauges, on a recorded-format page
and against the emulated Triton."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import structlog.testing

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext, GpuAdapter
from infermesh.core.model import GpuKey, GpuState
from infermesh.core.plugins import PluginHost
from infermesh.dev.triton_emulator import (
    TritonEmulator,
    TritonEmulatorConfig,
    start_triton_emulator,
)
from infermesh.triton.gpu import TritonGpuAdapter, gpu_states
from infermesh.triton.metrics import read_metrics

pytestmark = pytest.mark.anyio

PAGES = Path(__file__).parent / "pages"
GPU = "GPU-7f0b3c1e-1a2b-4c3d-9e8f-0a1b2c3d4e5f"


def context(url: str, **options: object) -> AdapterContext:
    return AdapterContext(node="n1", name="tgpu", url=url, poll_interval_s=0.1, options=options)


def test_gpu_states_keep_units_and_absent_gauges_stay_default() -> None:
    reading = read_metrics((PAGES / "gpu_two_models.txt").read_text(), 5.0)
    (state,) = gpu_states(reading, "n1", 5.0).values()
    assert state.key == GpuKey(node="n1", gpu_uuid=GPU)
    assert state.utilization == 0.64
    assert state.memory_total_bytes == 80 * 1024**3
    assert state.memory_used_bytes == 20 * 1024**3
    assert state.vram_headroom == 0.75
    assert (state.power_w, state.power_limit_w) == (412.5, 700.0)
    assert state.temperature_c == 0.0  # Triton has no temperature
    assert state.healthy
    sparse = read_metrics((PAGES / "two_gpus.txt").read_text(), 5.0)
    states = gpu_states(sparse, "n1", 5.0)
    assert [s.memory_total_bytes for s in states.values()] == [0, 0]
    assert (
        gpu_states(read_metrics((PAGES / "cpu_only_histogram.txt").read_text(), 0), "n1", 0) == {}
    )


@pytest.fixture
async def triton() -> AsyncIterator[TritonEmulator]:
    emulator = await start_triton_emulator(TritonEmulatorConfig(models=("simple",), load_s=0.0))
    yield emulator
    await emulator.aclose()


async def test_the_emulated_tritons_gpu_is_streamed(triton: TritonEmulator) -> None:
    adapter = TritonGpuAdapter(context(triton.metrics_url.removesuffix("/metrics")))
    assert adapter.url == triton.metrics_url
    states: dict[GpuKey, GpuState] = {}
    try:
        with anyio.fail_after(20):
            async for delta in adapter.deltas():
                states[delta.key] = states.get(delta.key, GpuState(key=delta.key)).apply(delta)
                break
    finally:
        await adapter.aclose()
    (state,) = states.values()
    assert state.key.gpu_uuid == triton.core.config.gpu_id()
    assert state.memory_total_bytes == 80 * 1024**3
    assert 0 < state.memory_used_bytes < state.memory_total_bytes
    assert state.labels.runtime == "triton"


async def test_an_unreadable_source_is_logged_once(triton: TritonEmulator) -> None:
    adapter = TritonGpuAdapter(context(triton.http_url + "/metrics"))  # the HTTP port: 404
    with structlog.testing.capture_logs() as logs:
        async with anyio.create_task_group() as group:

            async def consume() -> None:
                async for _ in adapter.deltas():
                    pass

            group.start_soon(consume)
            deadline = time.monotonic() + 20
            while not [e for e in logs if e["log_level"] == "error"]:
                assert time.monotonic() < deadline, "no error logged"
                await anyio.sleep(0.02)
            await anyio.sleep(0.3)  # a few more polls
            group.cancel_scope.cancel()
    await adapter.aclose()
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["reason"] == f"{triton.http_url}/metrics returned HTTP 404"
    assert adapter.states == {}


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("127.0.0.1:8002", {}, "must be Triton's metrics URL"),
        ("http://127.0.0.1:8002/metrics", {"x": 1}, "takes no options, got x"),
    ],
)
def test_bad_gpu_sources_are_config_errors(
    url: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        TritonGpuAdapter(context(url, **options))


def test_the_triton_gpu_kind_is_registered_through_the_entry_point() -> None:
    host = PluginHost.load(allow=["triton"])
    adapter = host.gpu_adapters()["triton"](context("http://127.0.0.1:8002/metrics"))
    assert isinstance(adapter, GpuAdapter)

"""`[[gpus]] kind = "dcgm"` against the emulated dcgm-exporter (real HTTP): GPUs streamed as
deltas, control changes seen on the next scrape, and an exporter that is down or serves garbage
neither raises nor marks the GPUs broken."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import anyio
import pytest
import structlog.testing
from aiohttp import web

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext, GpuAdapter
from infermesh.core.model import GpuKey, GpuState
from infermesh.core.plugins import PluginHost
from infermesh.dcgm.exporter import DEFAULT_URL, DcgmExporterAdapter
from infermesh.dev.dcgm_emulator import DcgmEmulator, DcgmEmulatorConfig, start_dcgm_emulator
from infermesh.dev.dcgm_fleet import DcgmFleetConfig

pytestmark = pytest.mark.anyio


def context(url: str, **options: object) -> AdapterContext:
    return AdapterContext(node="n1", name="dcgm0", url=url, poll_interval_s=0.05, options=options)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def exporter() -> AsyncIterator[DcgmEmulator]:
    emulator = await start_dcgm_emulator(
        DcgmEmulatorConfig(fleet=DcgmFleetConfig(gpus=2, hostname_label="hostname"))
    )
    yield emulator
    await emulator.aclose()


async def control(emulator: DcgmEmulator, uuid: str, body: dict[str, object]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(emulator.control_url(uuid), json=body) as response,
    ):
        assert response.status == 200, await response.text()


async def test_gpus_are_streamed_and_a_control_change_shows_on_the_next_scrape(
    exporter: DcgmEmulator,
) -> None:
    clock = Clock()
    adapter = DcgmExporterAdapter(context(exporter.url), clock=clock)
    assert adapter.url == exporter.metrics_url
    states: dict[GpuKey, GpuState] = {}

    async def poll() -> list[GpuKey]:
        deltas = await adapter.poll_once()
        for delta in deltas:
            states[delta.key] = states.get(delta.key, GpuState(key=delta.key)).apply(delta)
        return [delta.key for delta in deltas]

    try:
        first = await poll()
        assert sorted(k.gpu_uuid for k in first) == sorted(exporter.uuids)
        assert await poll() == []  # nothing changed, not even the time
        hot, other = exporter.uuids
        await control(exporter, hot, {"state": "hot"})
        await control(exporter, other, {"state": "xid", "xid": 48})
        clock.now += 1
        assert sorted(await poll()) == sorted(first)
        hot_state = states[GpuKey("n1", hot)]
        assert hot_state.temperature_c == 92.0
        assert hot_state.throttle_reasons == ("sw_thermal_slowdown",)
        assert hot_state.labels.get("hostname") == "emulated-node"
        assert hot_state.last_updated == 1001.0
        assert states[GpuKey("n1", other)].health == (False, "XID 48 reported")
        await control(exporter, other, {"state": "recover"})
        clock.now += 1
        await poll()
        assert states[GpuKey("n1", other)].health == (True, "ok")
    finally:
        await adapter.aclose()


async def test_deltas_stream_until_cancelled(exporter: DcgmEmulator) -> None:
    adapter = DcgmExporterAdapter(context(exporter.metrics_url))
    seen: set[str] = set()
    try:
        with anyio.fail_after(20):
            async for delta in adapter.deltas():
                seen.add(delta.key.gpu_uuid)
                if seen == set(exporter.uuids):
                    break
    finally:
        await adapter.aclose()


async def test_an_exporter_that_goes_away_keeps_the_last_states_and_logs_once() -> None:
    emulator = await start_dcgm_emulator()
    clock = Clock()
    adapter = DcgmExporterAdapter(context(emulator.metrics_url), clock=clock)
    try:
        assert len(await adapter.poll_once()) == 1
        before = dict(adapter.states)
        await emulator.aclose()
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                clock.now += 1
                assert await adapter.poll_once() == []
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 1
        assert "is dcgm-exporter running?" in errors[0]["reason"]
        assert adapter.problem == errors[0]["reason"]
        # Not marked unhealthy: the same values, last_updated left to age.
        assert adapter.states == before
        assert all(state.healthy for state in adapter.states.values())
    finally:
        await adapter.aclose()


async def serve(status: int, body: str) -> web.AppRunner:
    async def page(_: web.Request) -> web.Response:
        return web.Response(status=status, text=body)

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (200, "<html><body>502 Bad Gateway</body></html>", r"no DCGM_FI_\* series"),
        (200, 'DCGM_FI_DEV_GPU_TEMP{UUID="GPU-1"} hot\n', r"malformed exposition: line 1"),
        (503, "down", r"returned HTTP 503"),
    ],
)
async def test_a_page_that_is_not_an_exposition_is_a_clear_problem(
    status: int, body: str, problem: str
) -> None:
    runner = await serve(status, body)
    port = runner.addresses[0][1]
    adapter = DcgmExporterAdapter(context(f"http://127.0.0.1:{port}/metrics"))
    try:
        with structlog.testing.capture_logs() as logs:
            assert await adapter.poll_once() == []
        assert [e["log_level"] for e in logs] == ["error"]
        assert f"127.0.0.1:{port}/metrics" in adapter.problem
        assert re.search(problem, adapter.problem), adapter.problem
    finally:
        await adapter.aclose()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("", DEFAULT_URL),
        ("http://10.0.0.7:9400", "http://10.0.0.7:9400/metrics"),
        ("http://10.0.0.7:9400/", "http://10.0.0.7:9400/metrics"),
        ("https://dcgm.example/custom/path", "https://dcgm.example/custom/path"),
    ],
)
def test_url_defaults(url: str, expected: str) -> None:
    assert DcgmExporterAdapter(context(url)).url == expected


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("10.0.0.7:9400", {}, "must be dcgm-exporter's metrics URL"),
        ("http://10.0.0.7:9400/metrics", {"interval": 1}, "takes no options, got interval"),
    ],
)
def test_bad_sources_are_config_errors(url: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"gpus 'dcgm0' \(kind dcgm\): .*{message}"):
        DcgmExporterAdapter(context(url, **options))


def test_the_dcgm_kind_is_registered_through_the_entry_point() -> None:
    host = PluginHost.load(allow=["dcgm"])
    assert {"dcgm", "nvml"} <= set(host.gpu_adapters())
    adapter = host.gpu_adapters()["dcgm"](context(""))
    assert isinstance(adapter, GpuAdapter)

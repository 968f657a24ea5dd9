"""The emulated dcgm-exporter: its page, its control API, the speed of the replicas on a GPU,
and `infermesh dev dcgm` as a user runs it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from infermesh.dcgm.exporter_page import gpu_states, read_exporter_page
from infermesh.dev.cli import dev_group
from infermesh.dev.dcgm_emulator import (
    CONTENT_TYPE,
    DcgmEmulator,
    DcgmEmulatorConfig,
    build_dcgm_app,
    start_dcgm_emulator,
)
from infermesh.dev.dcgm_fleet import ControlError, DcgmFleetConfig
from infermesh.dev.harness import free_port, infermesh_command
from infermesh.dev.profiles import get_profile
from infermesh.dev.triton_emulator import TritonEmulatorConfig, start_triton_emulator
from infermesh.dev.vllm_emulator import EmulatorConfig, start_emulator

pytestmark = pytest.mark.anyio

UUIDS = ("GPU-00000000-0000-4000-8000-000000000001", "GPU-00000000-0000-4000-8000-000000000002")


class SpeedRecorder:
    """A stand-in replica that records what its /dev/speed route was sent."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.factors: list[float] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> SpeedRecorder:
        async def speed(request: web.Request) -> web.Response:
            self.factors.append(float((await request.json())["factor"]))
            return web.json_response({"factor": self.factors[-1]}, status=self.status)

        app = web.Application()
        app.router.add_post("/dev/speed", speed)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def aclose(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def replica() -> AsyncIterator[SpeedRecorder]:
    recorder = await SpeedRecorder().start()
    yield recorder
    await recorder.aclose()


@pytest.fixture
async def emulator(replica: SpeedRecorder) -> AsyncIterator[DcgmEmulator]:
    config = DcgmEmulatorConfig(
        fleet=DcgmFleetConfig(gpus=2, uuids=UUIDS),
        replicas={UUIDS[0]: (replica.url,)},
    )
    server = await start_dcgm_emulator(config)
    yield server
    await server.aclose()


async def post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def page(emulator: DcgmEmulator) -> str:
    async with aiohttp.ClientSession() as session, session.get(emulator.metrics_url) as response:
        assert response.headers["Content-Type"] == CONTENT_TYPE
        return await response.text()


async def test_page_reads_as_healthy_gpus_with_the_real_metric_names(
    emulator: DcgmEmulator,
) -> None:
    text = await page(emulator)
    for name in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_FB_RESERVED",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_XID_ERRORS",
        "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
    ):
        assert f"# TYPE {name} " in text
    assert 'Hostname="emulated-node"' in text
    states = gpu_states(read_exporter_page(text), "n1", 0.0)
    assert sorted(key.gpu_uuid for key in states) == sorted(UUIDS)
    for state in states.values():
        assert state.health == (True, "ok")
        assert state.throttle_reasons == ()
        assert state.memory_total_bytes == 81559 * 1024**2


async def test_throttle_slows_the_replica_and_shows_on_the_page(
    emulator: DcgmEmulator, replica: SpeedRecorder
) -> None:
    status, answer = await post(emulator.control_url(UUIDS[0]), {"state": "throttle"})
    assert status == 200
    assert answer["state"] == "throttle"
    assert answer["speed_updates"] == [
        {"url": replica.url, "factor": 0.5, "status": 200, "detail": ""}
    ]
    assert replica.factors == [0.5]  # applied before the control call answered
    states = {
        k.gpu_uuid: s
        for k, s in gpu_states(read_exporter_page(await page(emulator)), "n", 0).items()
    }
    throttled = states[UUIDS[0]]
    assert throttled.throttle_reasons == ("sw_power_cap",)
    assert throttled.power_w == pytest.approx(0.98 * throttled.power_limit_w)
    assert states[UUIDS[1]].throttle_reasons == ()
    await post(emulator.control_url(UUIDS[0]), {"state": "recover"})
    assert replica.factors == [0.5, 1.0]


async def test_hot_xid_and_ecc_states(emulator: DcgmEmulator, replica: SpeedRecorder) -> None:
    await post(emulator.control_url(UUIDS[0]), {"state": "hot", "temperature_c": 95, "factor": 0.3})
    await post(emulator.control_url(UUIDS[1]), {"state": "xid", "xid": 48})
    states = {
        k.gpu_uuid: s
        for k, s in gpu_states(read_exporter_page(await page(emulator)), "n", 0).items()
    }
    assert states[UUIDS[0]].temperature_c == 95.0
    assert states[UUIDS[0]].throttle_reasons == ("sw_thermal_slowdown",)
    assert replica.factors == [0.3]
    assert states[UUIDS[1]].health == (False, "XID 48 reported")
    await post(emulator.control_url(UUIDS[1]), {"state": "ecc", "dbe": 2})
    (ecc,) = [
        s
        for k, s in gpu_states(read_exporter_page(await page(emulator)), "n", 0).items()
        if k.gpu_uuid == UUIDS[1]
    ]
    assert ecc.ecc_dbe_volatile == 2
    assert ecc.remapped_rows_pending
    assert ecc.xid_last == 0
    assert not ecc.healthy
    async with (
        aiohttp.ClientSession() as session,
        session.get(emulator.url + "/control/gpus") as response,
    ):
        listing = await response.json()
    assert [(g["uuid"], g["state"]) for g in listing["gpus"]] == [
        (UUIDS[0], "hot"),
        (UUIDS[1], "ecc"),
    ]
    assert listing["gpus"][0]["replicas"] == [replica.url]


@pytest.mark.parametrize(
    ("uuid", "body", "status", "message"),
    [
        ("GPU-nope", {"state": "hot"}, 404, "no emulated GPU 'GPU-nope'; the GPUs are: GPU-"),
        (UUIDS[0], {"state": "melt"}, 400, "'state' must be one of throttle, hot, xid"),
        (UUIDS[0], {"state": "hot", "speed": 2}, 400, "unknown key(s) speed"),
        (UUIDS[0], {"state": "throttle", "factor": 1.5}, 400, "'factor' must be in [0, 1]"),
        (UUIDS[0], {"state": "throttle", "factor": 0}, 400, "'factor' must be above 0"),
        (
            UUIDS[0],
            {"state": "hot", "reasons": ["warm"]},
            400,
            "unknown clock-event reason(s) warm",
        ),
        (UUIDS[0], ["hot"], 400, "must be a JSON object"),
    ],
)
async def test_bad_control_requests_say_what_to_send(
    emulator: DcgmEmulator, uuid: str, body: object, status: int, message: str
) -> None:
    got_status, answer = await post(emulator.control_url(uuid), body)
    assert got_status == status
    assert message in str(answer["error"])


async def test_a_replica_without_the_speed_route_is_tolerated() -> None:
    missing = await SpeedRecorder(status=404).start()
    gone = free_port()
    config = DcgmEmulatorConfig(
        fleet=DcgmFleetConfig(uuids=UUIDS[:1]),
        replicas={UUIDS[0]: (missing.url, f"http://127.0.0.1:{gone}")},
    )
    server = await start_dcgm_emulator(config)
    try:
        status, answer = await post(server.control_url(UUIDS[0]), {"state": "hot"})
        assert status == 200
        updates = answer["speed_updates"]
        assert isinstance(updates, list)
        assert [u["status"] for u in updates] == [404, None]
        assert str(updates[1]["detail"]).startswith("unreachable")
    finally:
        await server.aclose()
        await missing.aclose()


async def test_mig_instances_and_lowercase_hostname() -> None:
    config = DcgmEmulatorConfig(
        fleet=DcgmFleetConfig(
            mig=("3g.40gb", "2g.20gb"), hostname_label="hostname", uuids=UUIDS[:1]
        )
    )
    server = await start_dcgm_emulator(config)
    try:
        text = await page(server)
    finally:
        await server.aclose()
    assert 'hostname="emulated-node"' in text
    assert "DCGM_FI_DEV_GPU_UTIL" not in text  # unsupported in MIG mode
    states = {k.gpu_uuid: s for k, s in gpu_states(read_exporter_page(text), "n", 0).items()}
    assert set(states) == {UUIDS[0], f"{UUIDS[0]}/gi1", f"{UUIDS[0]}/gi2"}
    assert states[f"{UUIDS[0]}/gi2"].mig_profile == "2g.20gb"
    assert states[f"{UUIDS[0]}/gi2"].memory_total_bytes == 20 * 1024**3


async def test_a_mixed_node_shows_each_gpu_with_its_model_and_clocks() -> None:
    config = DcgmEmulatorConfig(
        fleet=DcgmFleetConfig(
            gpus=3, uuids=(*UUIDS, "GPU-3"), model_names=("NVIDIA A10", "NVIDIA A100-SXM4-80GB")
        )
    )
    server = await start_dcgm_emulator(config)
    try:
        await post(server.control_url(UUIDS[0]), {"state": "hot", "factor": 0.25})
        text = await page(server)
    finally:
        await server.aclose()
    states = {k.gpu_uuid: s for k, s in gpu_states(read_exporter_page(text), "n", 0).items()}
    assert states[UUIDS[0]].name == "NVIDIA A10"
    assert states[UUIDS[1]].name == "NVIDIA A100-SXM4-80GB"
    assert states["GPU-3"].name == "NVIDIA H100 80GB HBM3"  # the default for the rest
    assert states[UUIDS[0]].memory_total_bytes == 23028 * 1024**2
    assert states[UUIDS[0]].throttle_reasons == ("sw_thermal_slowdown",)
    assert states[UUIDS[0]].temperature_c == 92.0
    # A hot A10 at a quarter speed: a quarter of its own top SM clock (1695 MHz).
    assert f'DCGM_FI_DEV_SM_CLOCK{{gpu="0",UUID="{UUIDS[0]}"' in text
    sm_clock = {
        line.split('UUID="')[1].split('"')[0]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line.startswith("DCGM_FI_DEV_SM_CLOCK{")
    }
    assert sm_clock == {UUIDS[0]: "424", UUIDS[1]: "1410", "GPU-3": "1980"}


def test_fleet_config_and_mapping_errors() -> None:
    with pytest.raises(ValueError, match="3 model names given for 2 GPUs"):
        DcgmFleetConfig(gpus=2, model_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="a GPU model name is empty"):
        DcgmFleetConfig(gpus=2, model_names=(" ",))
    with pytest.raises(ValueError, match="need more than 7 slices"):
        DcgmFleetConfig(mig=("4g.40gb", "4g.40gb"))
    with pytest.raises(ValueError, match=r"is not like '3g\.40gb'"):
        DcgmFleetConfig(mig=("big",))
    with pytest.raises(ControlError, match="no emulated GPU 'GPU-x'"):
        build_dcgm_app(DcgmEmulatorConfig(replicas={"GPU-x": ("http://127.0.0.1:1",)}))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dcgm", "--replica", "0"], "is not GPU=URL"),
        (["dcgm", "--gpus", "2", "--replica", "5=http://127.0.0.1:1"], "no emulated GPU '5'"),
        (["dcgm", "--mig", "9g.90gb"], "is not like '3g.40gb'"),
        (
            ["dcgm", "--gpus", "2", *("--model-name", "NVIDIA A10") * 3],
            "3 model names given for 2 GPUs",
        ),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(dev_group, args)
    assert result.exit_code == 2
    assert message in result.output


async def test_dev_dcgm_serves_metrics_and_stops_on_sigterm() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "dev",
        "dcgm",
        "--port",
        str(port),
        "--gpus",
        "3",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        text = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            for _ in range(600):
                assert process.returncode is None, "the emulator exited"
                try:
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        text = await response.text()
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
        assert len(read_exporter_page(text).devices) == 3
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_real_vllm_and_triton_emulators_follow_their_gpu() -> None:
    vllm = await start_emulator(EmulatorConfig(profile=get_profile("a10")))
    triton = await start_triton_emulator(TritonEmulatorConfig(models=("simple",), load_s=0.0))
    config = DcgmEmulatorConfig(
        fleet=DcgmFleetConfig(uuids=UUIDS[:1]),
        replicas={UUIDS[0]: (vllm.url, triton.http_url)},
    )
    server = await start_dcgm_emulator(config)
    try:
        _, answer = await post(server.control_url(UUIDS[0]), {"state": "throttle", "factor": 0.25})
        assert [(u["url"], u["status"]) for u in answer["speed_updates"]] == [
            (vllm.url, 200),
            (triton.http_url, 200),
        ]
        assert triton.core.slowdown == 4.0  # Triton's route takes a time multiplier: 1 / 0.25
        _, answer = await post(server.control_url(UUIDS[0]), {"state": "recover"})
        assert triton.core.slowdown == 1.0
        async with (
            aiohttp.ClientSession() as session,
            session.post(vllm.url + "/dev/speed", json={"factor": 1.0}) as response,
        ):
            assert (await response.json())["previous"] == 1.0  # recover set the vLLM back to 1
    finally:
        await server.aclose()
        await triton.aclose()
        await vllm.aclose()

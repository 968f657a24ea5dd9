"""An emulated NVIDIA dcgm-exporter whose GPUs can be told to throttle, heat up or report an XID.

Routes: `GET /metrics` (the exposition, see `dcgm_fleet`), `GET /health`, `GET /control/gpus`
(every GPU's state) and `POST /control/gpus/{uuid}` with `{"state": "throttle"|"hot"|"xid"|
"ecc"|"recover", ...}`. A GPU mapped to emulated vLLM replicas (`replicas`: UUID -> base URLs)
slows them down too: each change POSTs `{"factor": F}` to the replica's dev-only
`/dev/speed` (emulated vLLM; emulated Triton: `PUT /infermesh/dev/slowdown {"factor": 1/F}`)
before the control call answers, so a throttled GPU is also a slower GPU. A replica without
either route (404) or unreachable is logged and skipped. A fake for development and tests; never
imported by the agent or the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Mapping

import aiohttp
import attrs
from aiohttp import web

from infermesh.core.logging import get_logger
from infermesh.dev.dcgm_fleet import ControlError, DcgmFleet, DcgmFleetConfig, EmulatedGpu

__all__ = [
    "DcgmEmulator",
    "DcgmEmulatorConfig",
    "build_dcgm_app",
    "run_dcgm_emulator",
    "start_dcgm_emulator",
]

log = get_logger("infermesh.dev.dcgm_emulator")

# What dcgm-exporter answers /metrics with (Go's promhttp, classic text format).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SPEED_PATH = "/dev/speed"
TRITON_SLOWDOWN_PATH = "/infermesh/dev/slowdown"
SPEED_TIMEOUT_S = 2.0


@attrs.frozen
class DcgmEmulatorConfig:
    """The emulated GPUs and which emulated vLLM replicas run on which of them."""

    fleet: DcgmFleetConfig = attrs.field(factory=DcgmFleetConfig)
    replicas: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    """GPU UUID -> base URLs of the emulated vLLM replicas that run on it."""


@attrs.frozen
class SpeedUpdate:
    """What one replica answered to a speed change."""

    url: str
    factor: float
    status: int | None
    """HTTP status, or None when the replica could not be reached."""
    detail: str = ""

    def as_json(self) -> dict[str, object]:
        return {
            "url": self.url,
            "factor": self.factor,
            "status": self.status,
            "detail": self.detail,
        }


class _Control:
    """The control API: applies commands to the fleet and passes speed changes to replicas."""

    def __init__(self, fleet: DcgmFleet, replicas: Mapping[str, tuple[str, ...]]) -> None:
        self.fleet = fleet
        self.replicas = {uuid: tuple(urls) for uuid, urls in replicas.items()}
        for uuid in self.replicas:
            fleet.gpu(uuid)  # ControlError naming the known GPUs for a mapping to no GPU
        self._session: aiohttp.ClientSession | None = None

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.fleet.render().encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def list_gpus(self, request: web.Request) -> web.Response:
        return web.json_response({"gpus": [self._describe(gpu) for gpu in self.fleet.gpus]})

    async def control(self, request: web.Request) -> web.Response:
        uuid = request.match_info["uuid"]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _problem(400, 'the body must be JSON like {"state": "throttle"}')
        if not isinstance(body, dict):
            return _problem(400, 'the body must be a JSON object like {"state": "throttle"}')
        try:
            self.fleet.gpu(uuid)
        except ControlError as exc:
            return _problem(404, str(exc))
        try:
            gpu = self.fleet.control(uuid, body)
        except ControlError as exc:
            return _problem(400, str(exc))
        log.info(
            "emulated GPU changed",
            gpu=uuid,
            state=gpu.state,
            speed_factor=gpu.speed_factor,
            reasons=",".join(gpu.clock_event_reasons),
            xid=gpu.xid,
        )
        updates = await self._set_speed(gpu)
        answer = self._describe(gpu)
        answer["speed_updates"] = [update.as_json() for update in updates]
        return web.json_response(answer)

    def _describe(self, gpu: EmulatedGpu) -> dict[str, object]:
        answer = gpu.snapshot()
        answer["replicas"] = list(self.replicas.get(gpu.uuid, ()))
        return answer

    async def _set_speed(self, gpu: EmulatedGpu) -> list[SpeedUpdate]:
        urls = self.replicas.get(gpu.uuid, ())
        if not urls:
            return []
        if self._session is None:
            self._session = aiohttp.ClientSession()
        session = self._session
        return list(
            await asyncio.gather(
                *(self._post_speed(session, url, gpu.speed_factor) for url in urls)
            )
        )

    @staticmethod
    async def _post_speed(
        session: aiohttp.ClientSession, base_url: str, factor: float
    ) -> SpeedUpdate:
        """vLLM emulator: POST /dev/speed {"factor": F}; where that route is missing (404), the
        Triton emulator's PUT /infermesh/dev/slowdown {"factor": 1/F} (time multiplier)."""
        url = base_url.rstrip("/") + SPEED_PATH
        timeout = aiohttp.ClientTimeout(total=SPEED_TIMEOUT_S)
        try:
            async with session.post(url, json={"factor": factor}, timeout=timeout) as response:
                text = (await response.text())[:200]
                status = response.status
            if status == 404:
                url = base_url.rstrip("/") + TRITON_SLOWDOWN_PATH
                async with session.put(
                    url, json={"factor": 1.0 / factor}, timeout=timeout
                ) as response:
                    text = (await response.text())[:200]
                    status = response.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("replica speed not changed: unreachable", url=url, error=str(exc))
            return SpeedUpdate(base_url, factor, None, f"unreachable: {exc}")
        if status == 404:
            log.warning(
                "replica speed not changed: it has neither /dev/speed (emulated vLLM) nor "
                "/infermesh/dev/slowdown (emulated Triton)",
                url=base_url,
            )
        elif status >= 300:
            log.warning("replica refused the speed change", url=url, status=status, body=text)
        return SpeedUpdate(base_url, factor, status, "" if status < 300 else text)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _build(config: DcgmEmulatorConfig) -> tuple[web.Application, _Control]:
    control = _Control(DcgmFleet(config.fleet), config.replicas)
    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", control.metrics),
            web.get("/health", control.health),
            web.get("/control/gpus", control.list_gpus),
            web.post("/control/gpus/{uuid}", control.control),
        ]
    )

    async def close_session(_: web.Application) -> None:
        await control.aclose()

    app.on_cleanup.append(close_session)
    return app, control


def build_dcgm_app(config: DcgmEmulatorConfig) -> web.Application:
    """The emulator's aiohttp application. Raises ControlError for a mapping to an unknown GPU."""
    return _build(config)[0]


@attrs.define
class DcgmEmulator:
    """A running in-process dcgm-exporter emulator (tests, benchmarks, `infermesh dev dcgm`).

    `fleet` is the emulated GPUs: tests read UUIDs from `fleet.gpus` and may drive them through
    the HTTP control API (`control_url(uuid)`) so that replicas' speeds follow.
    """

    fleet: DcgmFleet
    host: str
    port: int
    _runner: web.AppRunner

    @property
    def url(self) -> str:
        """Base URL; the exposition is at `metrics_url`."""
        return f"http://{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    @property
    def uuids(self) -> list[str]:
        return [gpu.uuid for gpu in self.fleet.gpus]

    def control_url(self, uuid: str) -> str:
        return f"{self.url}/control/gpus/{uuid}"

    async def aclose(self) -> None:
        await self._runner.cleanup()


async def start_dcgm_emulator(
    config: DcgmEmulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> DcgmEmulator:
    """Serve an emulated dcgm-exporter inside the running event loop (port 0 picks a free one)."""
    app, control = _build(config or DcgmEmulatorConfig())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return DcgmEmulator(
        fleet=control.fleet, host=host, port=int(runner.addresses[0][1]), runner=runner
    )


def run_dcgm_emulator(config: DcgmEmulatorConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM (the `infermesh dev dcgm` command)."""

    async def main() -> None:
        emulator = await start_dcgm_emulator(config, host=host, port=port)
        log.info("dcgm-exporter emulator serving", url=emulator.metrics_url, gpus=emulator.uuids)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await emulator.aclose()

    asyncio.run(main())

"""An emulated NVIDIA Triton server: KServe v2 HTTP, gRPC and the metrics port, in one process.

The aiohttp HTTP front end (health, metadata, infer with JSON or binary tensors, repository
API) and the wiring of the three listeners; behaviour lives in `triton_server`, models in
`triton_models`, the gRPC front end in `triton_grpc`. A fake for development and tests; never
imported by the agent or the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import Any

import attrs
import grpc
from aiohttp import web

from infermesh.dev.triton_grpc import add_to_server
from infermesh.dev.triton_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from infermesh.dev.triton_models import ModelSpec
from infermesh.dev.triton_server import (
    EMULATED_TRITON_VERSION,
    EXTENSIONS,
    TritonCore,
    TritonEmulatorConfig,
)
from infermesh.dev.triton_tensors import (
    KServeError,
    Tensor,
    binary_size,
    invalid,
    tensor_from_json,
    tensor_to_json,
    to_raw,
)

__all__ = [
    "TritonEmulator",
    "TritonEmulatorConfig",
    "build_http_app",
    "build_metrics_app",
    "run_triton_emulator",
    "start_triton_emulator",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
SLOWDOWN_PATH = "/infermesh/dev/slowdown"
"""Dev-only route: `PUT {"factor": 2.0}` makes every execution take twice as long (a throttled
GPU), `GET` reads the factor. Lets another process (a GPU emulator) slow this Triton down."""
JSON_TYPE = "application/json"


def _error(error: KServeError) -> web.Response:
    return web.json_response({"error": error.message}, status=error.status)


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version") or None


class _HttpFrontEnd:
    """KServe v2 HTTP routes over one TritonCore."""

    def __init__(self, core: TritonCore) -> None:
        self.core = core

    async def live(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.core.live else 400)

    async def ready(self, _request: web.Request) -> web.Response:
        return web.Response(status=200 if self.core.ready and self.core.live else 400)

    async def server_metadata(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "triton", "version": EMULATED_TRITON_VERSION, "extensions": list(EXTENSIONS)}
        )

    async def model_metadata(self, request: web.Request) -> web.Response:
        asked = _version(request)
        try:
            spec, version = self.core.repository.resolve(request.match_info["model"], asked)
        except KServeError as exc:
            return _error(exc)
        return web.json_response(spec.metadata(version if asked else None))

    async def model_config(self, request: web.Request) -> web.Response:
        try:
            spec, _ = self.core.repository.resolve(request.match_info["model"], _version(request))
        except KServeError as exc:
            return _error(exc)
        return web.json_response(
            {
                "name": spec.name,
                "platform": spec.platform,
                "max_batch_size": spec.max_batch_size,
                "input": [_config_tensor(t.name, t.datatype, t.shape, spec) for t in spec.inputs],
                "output": [_config_tensor(t.name, t.datatype, t.shape, spec) for t in spec.outputs],
                "instance_group": [{"count": self.core.config.instance_count, "kind": "KIND_GPU"}],
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        if self.core.repository.is_ready(request.match_info["model"], _version(request)):
            return web.Response(status=200)
        return web.json_response({"error": "Model version not ready"}, status=400)

    async def infer(self, request: web.Request) -> web.Response:
        body = await request.read()
        model, version = request.match_info["model"], _version(request)
        try:
            document, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
            tensors, requested, binary_outputs, all_binary = _parse_infer(document, binary)
        except KServeError as exc:
            self.core.count_bad_request(model, version)
            return _error(exc)
        try:
            result = await self.core.infer(model, version, tensors, requested)
        except KServeError as exc:
            return _error(exc)
        response: dict[str, Any] = {
            "model_name": result.model.name,
            "model_version": result.version,
        }
        if isinstance(document.get("id"), str):
            response["id"] = document["id"]
        outputs: list[dict[str, Any]] = []
        blobs: list[bytes] = []
        for tensor in result.outputs:
            if all_binary or tensor.name in binary_outputs:
                blob = to_raw(tensor)
                blobs.append(blob)
                outputs.append(
                    {
                        "name": tensor.name,
                        "datatype": tensor.datatype,
                        "shape": list(tensor.shape),
                        "parameters": {"binary_data_size": len(blob)},
                    }
                )
            else:
                outputs.append(tensor_to_json(tensor))
        response["outputs"] = outputs
        header = json.dumps(response, separators=(",", ":")).encode()
        if not blobs:
            return web.Response(body=header, content_type=JSON_TYPE)
        return web.Response(
            body=header + b"".join(blobs),
            headers={HEADER_LENGTH: str(len(header))},
            content_type="application/octet-stream",
        )

    async def slowdown(self, request: web.Request) -> web.Response:
        """Dev only (not a Triton route): read or set how much slower the emulated GPU runs."""
        if request.method == "PUT":
            try:
                document = await request.json()
            except ValueError:
                return _error(invalid('the body must be JSON: {"factor": <number >= 1>}'))
            factor = document.get("factor") if isinstance(document, dict) else None
            if isinstance(factor, bool) or not isinstance(factor, int | float) or factor < 1:
                return _error(invalid(f"factor must be a number >= 1, got {factor!r}"))
            self.core.slowdown = float(factor)
        return web.json_response({"factor": self.core.slowdown})

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        ready_only = False
        if body.strip():
            try:
                document = json.loads(body)
            except ValueError:
                return _error(invalid("failed to parse the request JSON buffer"))
            if not isinstance(document, dict):
                return _error(invalid("the repository index request must be a JSON object"))
            ready_only = bool(document.get("ready", False))
        return web.json_response(self.core.repository.index(ready_only=ready_only))

    async def repository_load(self, request: web.Request) -> web.Response:
        try:
            parameters = await _parameters(request)
            await self.core.load(request.match_info["model"], parameters)
        except KServeError as exc:
            return _error(exc)
        return web.Response(status=200)

    async def repository_unload(self, request: web.Request) -> web.Response:
        try:
            await _parameters(request)
            self.core.unload(request.match_info["model"])
        except KServeError as exc:
            return _error(exc)
        return web.Response(status=200)


def _config_tensor(
    name: str, datatype: str, shape: tuple[int, ...], spec: ModelSpec
) -> dict[str, Any]:
    """One input/output of Triton's model configuration JSON (dims exclude the batch)."""
    dims = list(shape[1:]) if spec.max_batch_size > 0 else list(shape)
    data_type = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return {"name": name, "data_type": data_type, "dims": dims}


async def _parameters(request: web.Request) -> dict[str, object]:
    body = await request.read()
    if not body.strip():
        return {}
    try:
        document = json.loads(body)
    except ValueError:
        raise invalid("failed to parse the request JSON buffer") from None
    parameters = document.get("parameters", {}) if isinstance(document, dict) else None
    if not isinstance(parameters, dict):
        raise invalid("'parameters' must be a JSON object")
    return parameters


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of an infer request and the binary tensor data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise invalid(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise invalid(f"{HEADER_LENGTH} {length} is outside the body of {len(body)} bytes")
        json_part, binary = body[:length], body[length:]
    try:
        document = json.loads(json_part)
    except ValueError:
        raise invalid("failed to parse the request JSON buffer: not JSON") from None
    if not isinstance(document, dict):
        raise invalid("the inference request must be a JSON object")
    return document, binary


def _parse_infer(
    document: dict[str, Any], binary: bytes
) -> tuple[list[Tensor], list[str], set[str], bool]:
    """(input tensors, requested output names, outputs to send as binary, all as binary)."""
    entries = document.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise invalid("the inference request must have a non-empty 'inputs' list")
    tensors: list[Tensor] = []
    offset = 0
    for index, entry in enumerate(entries):
        size = binary_size(entry) if isinstance(entry, dict) else None
        raw = None
        if size is not None:
            if offset + size > len(binary):
                raise invalid(
                    f"input '{entry.get('name')}': binary_data_size {size} runs past the "
                    f"{len(binary)} bytes of binary data"
                )
            raw = binary[offset : offset + size]
            offset += size
        tensors.append(tensor_from_json(entry, index, raw))
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    parameters = document.get("parameters") or {}
    all_binary = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested: list[str] = []
    binary_outputs: set[str] = set()
    outputs = document.get("outputs") or []
    if not isinstance(outputs, list):
        raise invalid("'outputs' must be a list")
    for entry in outputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise invalid("each requested output must be an object with a string 'name'")
        requested.append(entry["name"])
        options = entry.get("parameters") or {}
        if all_binary or (isinstance(options, dict) and options.get("binary_data") is True):
            binary_outputs.add(entry["name"])
    return tensors, requested, binary_outputs, all_binary


def build_http_app(core: TritonCore) -> web.Application:
    """The KServe v2 HTTP application (Triton's port 8000)."""
    front = _HttpFrontEnd(core)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    model = "/v2/models/{model}"
    versioned = "/v2/models/{model}/versions/{version:[0-9]+}"
    routes = [
        web.get("/v2/health/live", front.live),
        web.get("/v2/health/ready", front.ready),
        web.get("/v2", front.server_metadata),
        web.post("/v2/repository/index", front.repository_index),
        web.post("/v2/repository/models/{model}/load", front.repository_load),
        web.post("/v2/repository/models/{model}/unload", front.repository_unload),
        web.get(SLOWDOWN_PATH, front.slowdown),
        web.put(SLOWDOWN_PATH, front.slowdown),
    ]
    for prefix in (model, versioned):
        routes += [
            web.get(prefix, front.model_metadata),
            web.get(prefix + "/config", front.model_config),
            web.get(prefix + "/ready", front.model_ready),
            web.post(prefix + "/infer", front.infer),
        ]
    app.add_routes(routes)
    return app


def build_metrics_app(core: TritonCore) -> web.Application:
    """The metrics application (Triton's port 8002): GET /metrics."""

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=core.metrics_text().encode(), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    app = web.Application()
    app.add_routes([web.get("/metrics", metrics)])
    return app


@attrs.define
class TritonEmulator:
    """A running emulated Triton (tests, benchmarks, `infermesh dev triton`).

    `core` is the server itself: tests can unload models, mark the server not ready or slow
    it down (`core.slowdown`) through it.
    """

    core: TritonCore
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    _runners: list[web.AppRunner]
    _grpc_server: grpc.aio.Server

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """`host:port` for a gRPC channel."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    async def aclose(self) -> None:
        await self._grpc_server.stop(grace=0.5)
        for runner in self._runners:
            await runner.cleanup()


async def _serve(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


async def start_triton_emulator(
    config: TritonEmulatorConfig | None = None,
    *,
    host: str = "127.0.0.1",
    http_port: int = 0,
    grpc_port: int = 0,
    metrics_port: int = 0,
) -> TritonEmulator:
    """Serve an emulated Triton inside the running event loop (0 picks a free port)."""
    core = TritonCore(config or TritonEmulatorConfig())
    runners: list[web.AppRunner] = []
    try:
        http_runner, bound_http = await _serve(build_http_app(core), host, http_port)
        runners.append(http_runner)
        metrics_runner, bound_metrics = await _serve(build_metrics_app(core), host, metrics_port)
        runners.append(metrics_runner)
        server = grpc.aio.server()
        add_to_server(server, core)
        bound_grpc = server.add_insecure_port(f"{host}:{grpc_port}")
        if bound_grpc == 0:
            raise OSError(f"cannot listen for gRPC on {host}:{grpc_port}")
        await server.start()
    except BaseException:
        for runner in runners:
            await runner.cleanup()
        raise
    return TritonEmulator(
        core=core,
        host=host,
        http_port=bound_http,
        grpc_port=bound_grpc,
        metrics_port=bound_metrics,
        runners=runners,
        grpc_server=server,
    )


def run_triton_emulator(
    config: TritonEmulatorConfig, host: str, http_port: int, grpc_port: int, metrics_port: int
) -> None:
    """Serve until SIGINT/SIGTERM (the `infermesh dev triton` command)."""

    async def main() -> None:
        emulator = await start_triton_emulator(
            config, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
        )
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

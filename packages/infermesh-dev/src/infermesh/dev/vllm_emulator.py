"""An emulated vLLM OpenAI server: vLLM's routes, shapes and /metrics over the engine model.

The aiohttp shell only: parsing and shapes live in `openai_protocol`, timing in `engine` and
`driver`, metric names in `metrics_page`. A fake for development and tests; never imported by
the agent or the router.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter, deque

import attrs
from aiohttp import web

from infermesh.core.logging import get_logger
from infermesh.dev import openai_protocol as proto
from infermesh.dev.driver import EngineDriver
from infermesh.dev.engine import Engine, EngineConfig, EngineRequest, EngineSnapshot
from infermesh.dev.lora_registry import LoraRegistry
from infermesh.dev.metrics_page import CONTENT_TYPE, VllmMetricsPage
from infermesh.dev.profiles import DEFAULT_MODEL, GpuProfile, get_profile
from infermesh.dev.request_log import RequestLog
from infermesh.dev.tokens import filler_text, filler_token

__all__ = ["DEFAULT_MODEL", "EmulatorConfig", "EmulatorServer", "build_app", "start_emulator"]

log = get_logger("infermesh.dev.vllm_emulator")

EMULATED_VLLM_VERSION = "0.33.0"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
JSON_TYPE = "application/json"
TRACES_KEPT = 256
"""Generation and embedding requests `GET /dev/traces` remembers (the most recent)."""


@attrs.frozen
class EmulatorConfig:
    """What `infermesh dev vllm` serves and how fast."""

    model: str = DEFAULT_MODEL
    profile: GpuProfile = attrs.field(factory=lambda: get_profile("h100"))
    max_num_seqs: int | None = None
    num_gpu_blocks: int | None = None
    max_model_len: int | None = None
    loras: tuple[str, ...] = ()
    """Adapters served from the start (vLLM's `--lora-modules`); listed with root /adapters/NAME."""
    max_loras: int = 4
    """Adapters loaded at once; a runtime load beyond it is refused with vLLM's error."""
    runtime_lora_updating: bool = True
    """vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING: without it the load/unload routes answer 404."""
    seed: int = 0
    replica_tag: str = ""
    """Put into response ids (`chatcmpl-<tag>-...`) so a load generator can tell replicas apart."""
    default_max_tokens: int = 64
    enable_prefix_caching: bool = True
    enable_prompt_tokens_details: bool = False
    """vLLM's `--enable-prompt-tokens-details`: usage reports the prefix-cache hit as
    `prompt_tokens_details.cached_tokens` (when above 0)."""
    stall_prob: float = 0.0
    """Share of generation requests held `stall_s` before anything is answered (a GPU stall)."""
    stall_s: float = 2.0
    fail_prob: float = 0.0
    """Share of generation requests answered `fail_status` at once, before any body."""
    fail_status: int = 500

    def __attrs_post_init__(self) -> None:
        for name in ("stall_prob", "fail_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.stall_s < 0:
            raise ValueError(f"stall_s must be >= 0, got {self.stall_s}")
        if not (self.fail_status == 429 or 500 <= self.fail_status <= 599):
            raise ValueError(f"fail_status must be 429 or a 5xx status, got {self.fail_status}")

    def engine_config(self) -> EngineConfig:
        return EngineConfig.from_profile(
            self.profile,
            max_num_seqs=self.max_num_seqs,
            num_gpu_blocks=self.num_gpu_blocks,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching,
        )


class _Emulator:
    """Request handlers and per-process state of one emulated server."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.lora_enabled = bool(config.loras) or config.runtime_lora_updating
        max_loras = max(config.max_loras, len(config.loras))
        self.engine_config = config.engine_config()
        self.metrics = VllmMetricsPage(
            config.model,
            self.engine_config,
            gpu_memory_utilization=config.profile.gpu_memory_utilization,
            max_loras=max_loras if self.lora_enabled else 0,
        )
        self.requests = RequestLog()
        """Each finished engine request's queue wait, prefill and cache hit (`/dev/requests`)."""
        self.driver = (
            None
            if config.profile.instant
            else EngineDriver(
                Engine(self.engine_config), self.metrics, on_finished=self.requests.finished
            )
        )
        self.loras = LoraRegistry(config.model, max_loras)
        for name in config.loras:
            self.loras.load(name, f"/adapters/{name}")
        self.created = int(time.time())
        self._id_prefix = f"{config.replica_tag}-" if config.replica_tag else ""
        self._in_flight = 0
        self._in_flight_by_adapter: Counter[str] = Counter()
        self._faults = random.Random(config.seed)
        self.injected: Counter[str] = Counter()
        """`requests`, `stalls`, `faults`, `cancelled`: exported on /metrics."""
        self.traces: deque[dict[str, str]] = deque(maxlen=TRACES_KEPT)
        """The trace context of the last generation and embedding requests (`/dev/traces`)."""

    @property
    def served_models(self) -> list[str]:
        return [self.config.model, *self.loras.paths]

    def _cached(self, cached_tokens: int) -> int | None:
        """What usage reports as cached: only under `enable_prompt_tokens_details`."""
        return cached_tokens if self.config.enable_prompt_tokens_details else None

    def _request_id(self, kind: proto.Kind) -> str:
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return f"{prefix}-{self._id_prefix}{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ app lifecycle

    async def on_startup(self, _app: web.Application) -> None:
        if self.driver is not None:
            self.driver.start()

    async def on_cleanup(self, _app: web.Application) -> None:
        if self.driver is not None:
            await self.driver.aclose()

    # ------------------------------------------------------------------ simple routes

    async def health(self, _request: web.Request) -> web.Response:
        if self.driver is not None and not self.driver.healthy:
            return web.Response(status=503, text=self.driver.dead_reason)
        return web.Response(status=200)

    async def models(self, _request: web.Request) -> web.Response:
        body = proto.model_list(
            self.config.model, self.loras.paths, self.created, self.engine_config.max_model_len
        )
        return web.json_response(body)

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": EMULATED_VLLM_VERSION})

    async def load(self, _request: web.Request) -> web.Response:
        return web.json_response({"server_load": self._in_flight})

    async def metrics_route(self, _request: web.Request) -> web.Response:
        snapshot = (
            self.driver.snapshot()
            if self.driver is not None
            else EngineSnapshot(
                running=self._in_flight,
                waiting=0,
                kv_cache_usage=0.0,
                num_free_blocks=self.engine_config.num_gpu_blocks,
                num_cached_blocks=0,
            )
        )
        running = [name for name, count in self._in_flight_by_adapter.items() if count > 0]
        page = self.metrics.render(snapshot, now=time.time(), running_adapters=running)
        return web.Response(
            body=page + self._injected_page(), headers={"Content-Type": CONTENT_TYPE}
        )

    def _injected_page(self) -> bytes:
        """The emulator's own counters (not vLLM's): requests, injected stalls and faults, and
        requests whose client went away before the answer ended (a cancelled hedge, say)."""
        lines: list[str] = []
        for name, what in _INJECTED_COUNTERS:
            metric = f"infermesh_emulator_{name}_total"
            lines += [
                f"# HELP {metric} {what}",
                f"# TYPE {metric} counter",
                f"{metric} {self.injected[name]}",
            ]
        return ("\n".join(lines) + "\n").encode()

    async def load_lora(self, request: web.Request) -> web.Response:
        if not self.config.runtime_lora_updating:
            return _not_found()
        body = await _json_object(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        try:
            self.loras.load(name, path)
        except proto.ApiError as error:
            return _error(error)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        if not self.config.runtime_lora_updating:
            return _not_found()
        body = await _json_object(request)
        name = body.get("lora_name")
        try:
            self.loras.unload(name)
        except proto.ApiError as error:
            return _error(error)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def set_speed(self, request: web.Request) -> web.Response:
        """Dev-only `POST /dev/speed {"factor": F}`: run at F (0 < F <= 1) of the profile's
        speed from the next engine step on, as on a throttled GPU (the dcgm-exporter emulator
        calls it when it throttles, heats or recovers a GPU). Not a vLLM route."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        factor = body.get("factor") if isinstance(body, dict) else None
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0 < factor <= 1:
            message = f'expected a JSON body {{"factor": F}} with 0 < F <= 1, got {body!r}'
            return web.json_response({"error": message}, status=400)
        if self.driver is None:
            message = f"profile {self.config.profile.name!r} answers instantly: it has no speed"
            return web.json_response({"error": message}, status=409)
        before = self.driver.engine.speed_factor
        self.driver.engine.speed_factor = float(factor)
        log.info("engine speed changed", factor=float(factor), previous=before)
        return web.json_response({"factor": float(factor), "previous": before})

    def record_trace(self, request: web.Request) -> None:
        """Remember the W3C trace context a request arrived with ('' when it had none)."""
        headers = request.headers
        self.traces.append(
            {
                "path": request.path,
                "x_request_id": headers.get("X-Request-Id", ""),
                "traceparent": headers.get("traceparent", ""),
                "tracestate": headers.get("tracestate", ""),
            }
        )

    async def dev_traces(self, _request: web.Request) -> web.Response:
        """Dev-only `GET /dev/traces`: the `traceparent` and `tracestate` headers (and path and
        `x-request-id`) of the last TRACES_KEPT generation and embedding requests, oldest
        first, so a test can check which trace a request reached the runtime in. Not a vLLM
        route."""
        return web.json_response({"requests": list(self.traces)})

    async def dev_requests(self, _request: web.Request) -> web.Response:
        """Dev-only `GET /dev/requests`: the last finished engine requests, oldest first, each
        with its `x_request_id`, `response_id`, the queue it found (`waiting_at_arrival`,
        `running_at_arrival`), `prompt_tokens`, `cached_tokens` (prefix-cache hit), and the
        engine's `queue_s`, `prefill_s`, `ttft_s` and `e2e_s`. Not a vLLM route."""
        return web.json_response({"requests": self.requests.entries()})

    # ------------------------------------------------------------------ generation

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate("chat", request)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate("completion", request)

    async def embeddings(self, request: web.Request) -> web.Response:
        """`POST /v1/embeddings`: deterministic unit vectors per input (see `embedding_vector`)."""
        self.record_trace(request)
        try:
            parsed = proto.parse_embedding_request(await request.read(), self.served_models)
        except proto.ApiError as error:
            return _error(error)
        request_id = f"embd-{self._id_prefix}{uuid.uuid4().hex}"
        body = proto.embedding_response(parsed, request_id, int(time.time()))
        headers = {"X-Request-Id": request.headers.get("X-Request-Id", request_id)}
        return web.json_response(body, headers=headers)

    async def _generate(self, kind: proto.Kind, request: web.Request) -> web.StreamResponse:
        self.record_trace(request)
        try:
            parsed = proto.parse_generation_request(
                kind,
                await request.read(),
                served_models=self.served_models,
                max_model_len=self.engine_config.max_model_len,
                default_max_tokens=self.config.default_max_tokens,
            )
        except proto.ApiError as error:
            return _error(error)
        if self.driver is not None and not self.driver.healthy:
            return _error(
                proto.ApiError(500, self.driver.dead_reason, error_type="EngineDeadError")
            )
        config = self.config
        self.injected["requests"] += 1
        if config.fail_prob and self._faults.random() < config.fail_prob:
            self.injected["faults"] += 1
            return _error(
                proto.ApiError(config.fail_status, "injected fault", error_type="InjectedFault")
            )
        try:
            if config.stall_prob and self._faults.random() < config.stall_prob:
                self.injected["stalls"] += 1
                await asyncio.sleep(config.stall_s)
            return await self._answer(kind, parsed, request)
        except asyncio.CancelledError:
            self.injected["cancelled"] += 1  # the client disconnected (aiohttp cancels us)
            raise

    async def _answer(
        self, kind: proto.Kind, parsed: proto.GenerationRequest, request: web.Request
    ) -> web.StreamResponse:
        request_id = self._request_id(kind)
        headers = {"X-Request-Id": request.headers.get("X-Request-Id", request_id)}
        self._in_flight += 1
        adapter = parsed.model if parsed.model != self.config.model else ""
        if adapter:
            self._in_flight_by_adapter[adapter] += 1
        try:
            if self.driver is None:
                return await self._instant(parsed, request, request_id, headers)
            return await self._engine(self.driver, parsed, request, request_id, headers)
        finally:
            self._in_flight -= 1
            if adapter:
                self._in_flight_by_adapter[adapter] -= 1

    async def _instant(
        self,
        parsed: proto.GenerationRequest,
        request: web.Request,
        request_id: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Answer at once: the whole body (or the whole stream) in one write."""
        prompt_tokens, completion_tokens = parsed.prompt_tokens, parsed.max_tokens
        self.metrics.record_instant(prompt_tokens, completion_tokens, parsed.finish_reason)
        created = int(time.time())
        if not parsed.stream:
            text = filler_text(completion_tokens, self.config.seed)
            build = proto.chat_response if parsed.kind == "chat" else proto.completion_response
            body = build(
                request_id,
                created,
                parsed.model,
                text,
                parsed.finish_reason,
                prompt_tokens,
                completion_tokens,
            )
            return web.Response(
                body=json.dumps(body).encode(), content_type=JSON_TYPE, headers=headers
            )
        events = _stream_events(
            parsed, request_id, created, 0, completion_tokens, True, offset=self.config.seed
        )
        if parsed.include_usage:
            events.append(
                proto.sse(
                    proto.usage_chunk(
                        parsed.kind,
                        request_id,
                        created,
                        parsed.model,
                        prompt_tokens,
                        completion_tokens,
                    )
                )
            )
        events.append(proto.SSE_DONE)
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)
        await response.write(b"".join(events))
        await response.write_eof()
        return response

    async def _engine(
        self,
        driver: EngineDriver,
        parsed: proto.GenerationRequest,
        request: web.Request,
        request_id: str,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Submit to the engine model and relay its tokens as its steps produce them."""
        self.requests.arrived(
            request_id, request.headers.get("X-Request-Id", ""), driver.snapshot(), time.time()
        )
        stream = driver.submit(
            EngineRequest(
                request_id=request_id,
                prompt_token_ids=parsed.prompt_token_ids,
                max_tokens=parsed.max_tokens,
                finish_reason=parsed.finish_reason,
            )
        )
        created = int(time.time())
        prompt_tokens = parsed.prompt_tokens
        finished = False
        try:
            if not parsed.stream:
                output = await stream.get()
                while not output.finished:
                    output = await stream.get()
                finished = True
                if output.finish_reason == "error":
                    return _error(
                        proto.ApiError(500, driver.dead_reason, error_type="EngineDeadError")
                    )
                text = filler_text(output.num_output_tokens, self.config.seed)
                build = proto.chat_response if parsed.kind == "chat" else proto.completion_response
                body = build(
                    request_id,
                    created,
                    parsed.model,
                    text,
                    parsed.finish_reason,
                    prompt_tokens,
                    output.num_output_tokens,
                    self._cached(output.cached_tokens),
                )
                return web.Response(
                    body=json.dumps(body).encode(), content_type=JSON_TYPE, headers=headers
                )
            response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await response.prepare(request)
            sent = cached = 0
            try:
                while not finished:
                    output = await stream.get()
                    finished = output.finished
                    cached = output.cached_tokens
                    if output.finish_reason == "error":
                        error = proto.ApiError(
                            500, driver.dead_reason, error_type="EngineDeadError"
                        )
                        await response.write(b"data: " + proto.error_body(error) + b"\n\n")
                        break
                    events = _stream_events(
                        parsed,
                        request_id,
                        created,
                        sent,
                        output.num_output_tokens,
                        finished,
                        prompt_tokens=prompt_tokens,
                        offset=self.config.seed,
                    )
                    sent = output.num_output_tokens
                    await response.write(b"".join(events))
                if parsed.include_usage and sent:
                    usage_chunk = proto.usage_chunk(
                        parsed.kind,
                        request_id,
                        created,
                        parsed.model,
                        prompt_tokens,
                        sent,
                        self._cached(cached),
                    )
                    await response.write(proto.sse(usage_chunk))
                await response.write(proto.SSE_DONE)
                await response.write_eof()
            except ConnectionResetError:
                # The client went away (a cancelled hedge, say); `finally` aborts the request.
                self.injected["cancelled"] += 1
            return response
        finally:
            if not finished:
                driver.abort(request_id)


_INJECTED_COUNTERS = (
    ("requests", "Generation requests received (valid ones, before any injected stall or fault)."),
    ("stalls", "Requests held stall_s before answering (--stall-prob)."),
    ("faults", "Requests answered fail_status at once (--fail-prob)."),
    ("cancelled", "Requests whose client disconnected before the answer ended (aborted)."),
)


def _stream_events(
    parsed: proto.GenerationRequest,
    request_id: str,
    created: int,
    first_index: int,
    end_index: int,
    finished: bool,
    *,
    prompt_tokens: int = 0,
    offset: int = 0,
) -> list[bytes]:
    """SSE events for generated tokens `first_index..end_index-1` (the role chunk first)."""
    events: list[bytes] = []
    model = parsed.model
    for index in range(first_index, end_index):
        last = finished and index == end_index - 1
        reason = parsed.finish_reason if last else None
        chunk_usage = (
            proto.usage(prompt_tokens or parsed.prompt_tokens, index + 1)
            if parsed.continuous_usage
            else None
        )
        if parsed.kind == "chat":
            if index == 0:
                events.append(
                    proto.sse(
                        proto.chat_chunk(
                            request_id, created, model, {"role": "assistant", "content": ""}
                        )
                    )
                )
            events.append(
                proto.sse(
                    proto.chat_chunk(
                        request_id,
                        created,
                        model,
                        {"content": filler_token(index, offset)},
                        reason,
                        chunk_usage,
                    )
                )
            )
        else:
            events.append(
                proto.sse(
                    proto.completion_chunk(
                        request_id, created, model, filler_token(index, offset), reason, chunk_usage
                    )
                )
            )
    return events


def _not_found() -> web.Response:
    """What FastAPI answers for a route vLLM did not register."""
    return web.json_response({"detail": "Not Found"}, status=404)


def _error(error: proto.ApiError) -> web.Response:
    return web.Response(status=error.status, body=proto.error_body(error), content_type=JSON_TYPE)


async def _json_object(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def build_app(config: EmulatorConfig) -> web.Application:
    """The aiohttp application of one emulated vLLM server."""
    emulator = _Emulator(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.on_startup.append(emulator.on_startup)
    app.on_cleanup.append(emulator.on_cleanup)
    app.add_routes(
        [
            web.get("/health", emulator.health),
            web.get("/ping", emulator.health),
            web.get("/version", emulator.version),
            web.get("/load", emulator.load),
            web.get("/metrics", emulator.metrics_route),
            web.get("/v1/models", emulator.models),
            web.post("/v1/chat/completions", emulator.chat),
            web.post("/v1/completions", emulator.completions),
            web.post("/v1/embeddings", emulator.embeddings),
            web.post("/v1/load_lora_adapter", emulator.load_lora),
            web.post("/v1/unload_lora_adapter", emulator.unload_lora),
            web.post("/dev/speed", emulator.set_speed),
            web.get("/dev/traces", emulator.dev_traces),
            web.get("/dev/requests", emulator.dev_requests),
        ]
    )
    return app


@attrs.define
class EmulatorServer:
    """A running in-process emulator (tests, benchmarks): its URL and how to stop it."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def aclose(self) -> None:
        await self.runner.cleanup()


async def start_emulator(
    config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> EmulatorServer:
    """Serve `config` on `host:port` (0 picks a free port) inside the running event loop."""
    # Like vLLM (`with_cancellation`), a client that disconnects aborts its request.
    runner = web.AppRunner(
        build_app(config), access_log=None, handle_signals=False, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    bound_port = int(runner.addresses[0][1])
    return EmulatorServer(runner=runner, host=host, port=bound_port)


def run_emulator(config: EmulatorConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM (the `infermesh dev vllm` command)."""
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # uvloop is optional; plain asyncio works the same, only slower
        loop = None
    web.run_app(
        build_app(config),
        host=host,
        port=port,
        access_log=None,
        print=None,
        loop=loop,
        shutdown_timeout=2.0,
        reuse_address=True,
        handler_cancellation=True,  # a client that disconnects aborts its request, as in vLLM
    )

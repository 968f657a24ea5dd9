"""Router test harness: a fake agent on a real UDS, tiny aiohttp runtimes, the router under uvicorn.

The fake agent answers both scoring modes from one description of the mesh: `route(model,
endpoints)` makes ScoreTargets rank `endpoints` in that order (agent mode) and publishes model
states whose KV-cache usage grows with the rank, on the State watch streams (local mode, where
the router ranks with the KV-headroom scorer only, so the order is the same). The fake runtimes
answer OpenAI requests (JSON or SSE) and can fail on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import grpc
import httpx2
import openai
import orjson
import pytest
import uvicorn
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from infermesh.core.config import HedgingConfig, ScoringConfig
from infermesh.core.contracts import Scorer
from infermesh.core.convert import (
    gpu_snapshot_delta_pb,
    gpu_state_to_pb,
    model_snapshot_delta_pb,
    model_state_to_pb,
)
from infermesh.core.model import GpuKey, GpuState, Labels, ModelState, TargetKey
from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.router.agent_client import AgentClient
from infermesh.router.agent_scoring import AgentScoring
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.decision import RouteScoring
from infermesh.router.local_scoring import LocalScoring
from infermesh.router.plugin import openai_http_transport
from infermesh.router.server import uvicorn_config

MAX_BODY_BYTES = 4096
WAIT_S = 10.0
NODE = "node"
MODES = ("local", "agent")
# Local mode ranks on KV-cache headroom alone, so the fake agent's published states order the
# targets exactly as its ScoreTargets does; telemetry never goes stale during a test.
TEST_SCORING = ScoringConfig(weights={"queue": 0.0, "prefix": 0.0}, stale_after_s=60.0)


def closed_port_endpoint() -> str:
    """A loopback URL on which nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def target_id(model: str, endpoint: str) -> str:
    return TargetKey(model=model, node=NODE, endpoint=endpoint).target_id


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""

    async def holds() -> bool:
        return condition()

    await wait_for(holds, what, timeout_s)


async def wait_for(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S
) -> None:
    """Poll the async `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- fake agent


class FakeAgent:
    """What the router sees of an agent: Scoring calls and the State service's views."""

    def __init__(self, first_version: int | None = None) -> None:
        self.routes: dict[str, list[str]] = {}
        self.models: dict[str, ModelState] = {}
        self.gpus: dict[GpuKey, GpuState] = {}
        self.score_requests: list[scoring_pb2.ScoreTargetsRequest] = []
        self.admits: list[scoring_pb2.AdmitRequest] = []
        self.outcomes: list[scoring_pb2.Outcome] = []
        self.changed = asyncio.Condition()
        self.watch_calls = 0
        self.snapshot_gate = asyncio.Event()
        """Watch streams send nothing until this is set (it is, unless a test clears it)."""
        self.snapshot_gate.set()
        self._watchers: list[asyncio.Queue[Any]] = []
        first = first_version if first_version is not None else int(time.time() * 1000)
        self._versions = itertools.count(first)

    def next_version(self) -> int:
        return next(self._versions)

    # ------------------------------------------------------------------ what the test changes

    def route(self, model: str, endpoints: list[str]) -> dict[str, int]:
        """Rank `endpoints` for `model` (first is best); returns target id -> published version.

        Endpoints routed before and left out are published unhealthy, so both modes stop using
        them. An empty list leaves the model known with no healthy target.
        """
        before = self.routes.get(model, [])
        self.routes[model] = list(endpoints)
        states = [
            self.state_of(model, endpoint, kv_cache_usage=0.1 * rank)
            for rank, endpoint in enumerate(endpoints)
        ]
        gone = [e for e in before if e not in endpoints] or (
            [] if endpoints or before else ["http://10.0.0.9:8000"]
        )
        states += [
            self.state_of(model, endpoint, healthy=False, health_reason="telemetry stale")
            for endpoint in gone
        ]
        self.publish(*states)
        return {s.key.target_id: s.version for s in states}

    def state_of(self, model: str, endpoint: str, **fields: Any) -> ModelState:
        """A fresh, healthy, loaded state for a target, with the next version and `fields`."""
        values: dict[str, Any] = {
            "labels": Labels(model=model, runtime="vllm", node=NODE),
            "loaded": True,
            "healthy": True,
            "last_updated": time.time(),
        }
        values.update(fields)
        key = TargetKey(model=model, node=NODE, endpoint=endpoint)
        return ModelState(key=key, version=self.next_version(), **values)

    def publish(self, *states: ModelState) -> None:
        """Make `states` current and send each to the open watch streams as a full delta."""
        for state in states:
            self.models[state.key.target_id] = state
            self._broadcast(model_snapshot_delta_pb(state))

    def publish_gpu(self, gpu: GpuState) -> None:
        self.gpus[gpu.key] = gpu
        self._broadcast(gpu_snapshot_delta_pb(gpu))

    def drop_watchers(self) -> None:
        """End every open watch stream with UNAVAILABLE (the router should reconnect)."""
        for queue in self._watchers:
            queue.put_nowait(None)

    def _broadcast(self, message: Any) -> None:
        for queue in self._watchers:
            queue.put_nowait(message)

    async def wait_outcome_for(self, target: str) -> scoring_pb2.Outcome:
        """The first outcome reported for `target` (a target id)."""

        def found() -> list[scoring_pb2.Outcome]:
            return [o for o in self.outcomes if o.target_id == target]

        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: bool(found()))
        return found()[0]

    async def wait_outcomes(self, count: int) -> list[scoring_pb2.Outcome]:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: len(self.outcomes) >= count)
        return list(self.outcomes)

    # ------------------------------------------------------------------ watch streams

    async def watch(
        self, kind: type[Any], snapshot: Iterable[Any], context: Any
    ) -> AsyncIterator[Any]:
        self.watch_calls += 1
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            await self.snapshot_gate.wait()
            for message in list(snapshot):
                yield message
            while True:
                message = await queue.get()
                if message is None:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
                if isinstance(message, kind):
                    yield message
        finally:
            self._watchers.remove(queue)


class FakeScoring(scoring_pb2_grpc.ScoringServicer):
    """Ranks `routes[model]` in order; records every call and outcome."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    async def ScoreTargets(
        self, request: scoring_pb2.ScoreTargetsRequest, context: Any
    ) -> scoring_pb2.ScoreTargetsResponse:
        agent = self.agent
        agent.score_requests.append(request)
        model = request.request.model
        endpoints = agent.routes.get(model)
        if endpoints is None:
            return scoring_pb2.ScoreTargetsResponse(model_known=False)
        if not endpoints:
            return scoring_pb2.ScoreTargetsResponse(
                model_known=True,
                candidates=1,
                excluded=[f"{target_id(model, 'http://10.0.0.9:8000')}: telemetry stale"],
                retry_after_s=2.5,
            )
        targets = [
            scoring_pb2.RankedTarget(
                target_id=target_id(model, endpoint),
                key=types_pb2.TargetKey(model=model, node=NODE, endpoint=endpoint),
                runtime="vllm",
                transport="openai-http",
                score=1.0 - 0.1 * rank,
            )
            for rank, endpoint in enumerate(endpoints[: request.max_targets or None])
        ]
        return scoring_pb2.ScoreTargetsResponse(
            model_known=True,
            targets=targets,
            candidates=len(endpoints),
            reservation_id=f"res-{len(agent.score_requests)}",
        )

    async def Admit(
        self, request: scoring_pb2.AdmitRequest, context: Any
    ) -> scoring_pb2.AdmitResponse:
        self.agent.admits.append(request)
        reservation_id = f"adm-{len(self.agent.admits)}"
        return scoring_pb2.AdmitResponse(admitted=True, reservation_id=reservation_id)

    async def ReportOutcome(
        self, request: scoring_pb2.OutcomeBatch, context: Any
    ) -> scoring_pb2.OutcomeAck:
        async with self.agent.changed:
            self.agent.outcomes.extend(request.outcomes)
            self.agent.changed.notify_all()
        return scoring_pb2.OutcomeAck(accepted=len(request.outcomes))

    async def StreamOutcomes(self, request_iterator: Any, context: Any) -> scoring_pb2.OutcomeAck:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the router")
        raise AssertionError("unreachable")


class FakeState(state_pb2_grpc.StateServicer):
    """List and watch what the fake agent holds (the calls a router makes)."""

    def __init__(self, agent: FakeAgent) -> None:
        self.agent = agent

    async def ListModelStates(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.ModelStateList:
        states = [model_state_to_pb(state) for state in self.agent.models.values()]
        return state_pb2.ModelStateList(states=states)

    async def ListGpuStates(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.GpuStateList:
        return state_pb2.GpuStateList(states=[gpu_state_to_pb(g) for g in self.agent.gpus.values()])

    async def WatchModelDeltas(
        self, request: state_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[types_pb2.ModelStateDelta]:
        snapshot = (model_snapshot_delta_pb(s) for s in self.agent.models.values())
        async for message in self.agent.watch(types_pb2.ModelStateDelta, snapshot, context):
            yield message

    async def WatchGpuDeltas(
        self, request: state_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[types_pb2.GpuStateDelta]:
        snapshot = (gpu_snapshot_delta_pb(g) for g in self.agent.gpus.values())
        async for message in self.agent.watch(types_pb2.GpuStateDelta, snapshot, context):
            yield message


@contextlib.asynccontextmanager
async def serving_fake_agent(
    socket_path: Path, agent: FakeAgent | None = None
) -> AsyncIterator[tuple[FakeAgent, Any]]:
    """`agent` (a new one by default) served on `socket_path`; yields it and its health."""
    agent = agent if agent is not None else FakeAgent()
    health = health_aio.HealthServicer()
    await health.set("infermesh.v1.Scoring", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServicer_to_server(FakeScoring(agent), server)
    # FakeState implements only the State methods a router calls.
    state_pb2_grpc.add_StateServicer_to_server(FakeState(agent), server)  # type: ignore[abstract]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        yield agent, health
    finally:
        agent.drop_watchers()
        await server.stop(None)


# ----------------------------------------------------------------------------- fake runtime


@attrs.define
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    peer: object
    """The client address of the connection the request came on."""


def _chunk(route: str, model: str, text: str) -> dict[str, Any]:
    if route == "/v1/chat/completions":
        choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
        kind = "text_completion"
    return {"id": "cmpl-1", "object": kind, "created": 0, "model": model, "choices": [choice]}


def _final(route: str, model: str) -> dict[str, Any]:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    if route == "/v1/chat/completions":
        message = {"role": "assistant", "content": "Hello"}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": "stop"}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": "Hello", "finish_reason": "stop", "logprobs": None}
        kind = "text_completion"
    return {
        "id": "cmpl-1",
        "object": kind,
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


class FakeRuntime:
    """An OpenAI-compatible server: 'Hel' + 'lo' (+ usage) as SSE or one JSON answer.

    `mode`: "ok", "error500" (answers 500 before any body), "empty" (200 with no body) or "die"
    (drops the connection after the first SSE event). A stream holds its second event until
    `release_rest` is set.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.mode = "ok"
        self.received: list[Received] = []
        self.release_rest = asyncio.Event()
        self.release_rest.set()
        self.sent_last = False
        self.endpoint = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        app.router.add_post("/v1/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.endpoint = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(Received(request.path_qs, headers, body, peer))
        if self.mode == "error500":
            return web.json_response({"error": "engine dead"}, status=500)
        if self.mode == "empty":
            return web.Response(status=200, headers={"x-runtime": self.name})
        payload = orjson.loads(body)
        model, route = payload["model"], request.path
        headers = {"x-runtime": self.name}
        if not payload.get("stream"):
            return web.json_response(_final(route, model), headers=headers)
        response = web.StreamResponse(headers={**headers, "content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(_chunk(route, model, "Hel")))
        if self.mode == "die":
            assert request.transport is not None
            request.transport.abort()
            return response
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT_S):
                await self.release_rest.wait()
        self.sent_last = True
        await response.write(sse(_chunk(route, model, "lo")))
        usage = {**_final(route, model), "choices": []}
        await response.write(sse(usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# ----------------------------------------------------------------------------- router


def make_scoring(
    mode: str,
    agent_target: str,
    *,
    scoring: ScoringConfig = TEST_SCORING,
    scorers: dict[str, Scorer] | None = None,
) -> RouteScoring:
    """The router's scoring for `mode`, with the built-in scorers unless `scorers` is given."""
    client = AgentClient(agent_target, timeout_s=2.0, models_cache_s=0.0)
    if mode == "agent":
        return AgentScoring(client)
    registered = scorers if scorers is not None else {s.name: s for s in builtin_scorers()}
    return LocalScoring(client, registered, scoring, watcher_backoff_s=(0.02, 0.2))


@contextlib.asynccontextmanager
async def running_router(scoring: RouteScoring) -> AsyncIterator[tuple[str, RouterApp]]:
    """The router app under uvicorn on a free loopback port; yields its base URL and the app."""
    app = RouterApp(
        scoring,
        {"openai-http": openai_http_transport},
        RouterSettings(max_body_bytes=MAX_BODY_BYTES, max_attempts=2, retry_after_s=1.0),
    )
    # Attempt counts are exact in these tests: no hedge may race a runtime that is merely slow
    # on a loaded machine. Hedging tests turn it on with `app.forwarder.configure(...)`.
    app.forwarder.configure(hedging=HedgingConfig(enabled=False))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, "127.0.0.1", port, "warning")
    config.load()
    server = uvicorn.Server(config)
    # What Server.serve() does, without taking over the test process's signal handlers.
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    assert server.started, "router did not start"
    main_loop = asyncio.create_task(server.main_loop())
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await main_loop
        await server.shutdown(sockets=[sock])
        sock.close()


def plain_http_client(base_url: str = "") -> httpx2.AsyncClient:
    """An HTTP client for loopback URLs; without TLS it skips loading CA certificates, which
    takes long enough on a loaded machine to trip the blocked-loop detector."""
    return httpx2.AsyncClient(base_url=base_url, timeout=WAIT_S, verify=False)


def replica_holds(app: RouterApp, versions: dict[str, int]) -> bool:
    """Whether a local-mode router ranks on (at least) these target versions."""
    if not isinstance(app.scoring, LocalScoring):
        return True
    live = app.scoring.replica.live
    if live is None:
        return False
    for tid, version in versions.items():
        state = live.get_target(tid)
        if state is None or state.version < version:
            return False
    return True


@attrs.define
class Mesh:
    mode: str
    agent: FakeAgent
    health: Any
    a: FakeRuntime
    b: FakeRuntime
    url: str
    app: RouterApp
    http: httpx2.AsyncClient
    openai: openai.AsyncOpenAI
    workdir: Path

    async def route(self, model: str, endpoints: list[str]) -> None:
        """Rank `endpoints` for `model` and wait until the router would route on that."""
        versions = self.agent.route(model, endpoints)
        await wait_until(lambda: replica_holds(self.app, versions), "the router to see the route")

    async def publish(self, *states: ModelState) -> None:
        """Publish `states` and wait until the router sees them."""
        self.agent.publish(*states)
        versions = {s.key.target_id: s.version for s in states}
        await wait_until(lambda: replica_holds(self.app, versions), "the router to see states")


@contextlib.asynccontextmanager
async def running_mesh(mode: str) -> AsyncIterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket_path = Path(workdir) / "agent.sock"
        a, b = FakeRuntime("a"), FakeRuntime("b")
        await a.start()
        await b.start()
        try:
            async with (
                serving_fake_agent(socket_path) as (agent, health),
                running_router(make_scoring(mode, f"unix://{socket_path}")) as (url, app),
                plain_http_client(base_url=url) as http,
                plain_http_client() as openai_http,
            ):
                client = openai.AsyncOpenAI(
                    base_url=f"{url}/v1", api_key="test", max_retries=0, http_client=openai_http
                )
                mesh = Mesh(mode, agent, health, a, b, url, app, http, client, Path(workdir))
                try:
                    await mesh.route("m", [a.endpoint, b.endpoint])
                    yield mesh
                finally:
                    await client.close()
        finally:
            await a.stop()
            await b.stop()


@pytest.fixture(params=MODES)
async def mesh(request: pytest.FixtureRequest) -> AsyncIterator[Mesh]:
    """Two runtimes behind the router, in each scoring mode; `m` is routed to a, then b."""
    async with running_mesh(request.param) as running:
        yield running


@pytest.fixture
async def local_mesh() -> AsyncIterator[Mesh]:
    async with running_mesh("local") as running:
        yield running


@pytest.fixture
async def agent_mesh() -> AsyncIterator[Mesh]:
    async with running_mesh("agent") as running:
        yield running

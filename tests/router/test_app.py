"""The router end to end in one process: uvicorn serving the app, a fake agent on a real UDS, and
tiny aiohttp runtimes on 127.0.0.1, driven with the real `openai` client and httpx.

The fake agent ranks the endpoints each test lists for a model, in that order; the fake runtimes
answer OpenAI requests (JSON or SSE) and can fail on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator
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
from openai.types.chat import ChatCompletionChunk

from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2, state_pb2_grpc, types_pb2
from infermesh.router.agent_client import AgentClient
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.plugin import openai_http_transport
from infermesh.router.server import uvicorn_config

MAX_BODY_BYTES = 4096
WAIT_S = 10.0


def closed_port_endpoint() -> str:
    """A loopback URL on which nothing listens: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- fake agent


class FakeScoring(scoring_pb2_grpc.ScoringServicer):
    """Ranks `routes[model]` in order; records every call and outcome."""

    def __init__(self) -> None:
        self.routes: dict[str, list[str]] = {}
        self.score_requests: list[scoring_pb2.ScoreTargetsRequest] = []
        self.admits: list[scoring_pb2.AdmitRequest] = []
        self.outcomes: list[scoring_pb2.Outcome] = []
        self.changed = asyncio.Condition()

    async def ScoreTargets(
        self, request: scoring_pb2.ScoreTargetsRequest, context: Any
    ) -> scoring_pb2.ScoreTargetsResponse:
        self.score_requests.append(request)
        model = request.request.model
        endpoints = self.routes.get(model)
        if endpoints is None:
            return scoring_pb2.ScoreTargetsResponse(model_known=False)
        if not endpoints:
            return scoring_pb2.ScoreTargetsResponse(
                model_known=True,
                candidates=1,
                excluded=[f"node|http://10.0.0.9:8000|{model}: telemetry stale"],
                retry_after_s=2.5,
            )
        targets = [
            scoring_pb2.RankedTarget(
                target_id=f"node|{endpoint}|{model}",
                key=types_pb2.TargetKey(model=model, node="node", endpoint=endpoint),
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
            reservation_id=f"res-{len(self.score_requests)}",
        )

    async def Admit(
        self, request: scoring_pb2.AdmitRequest, context: Any
    ) -> scoring_pb2.AdmitResponse:
        self.admits.append(request)
        return scoring_pb2.AdmitResponse(admitted=True, reservation_id=f"adm-{len(self.admits)}")

    async def ReportOutcome(
        self, request: scoring_pb2.OutcomeBatch, context: Any
    ) -> scoring_pb2.OutcomeAck:
        async with self.changed:
            self.outcomes.extend(request.outcomes)
            self.changed.notify_all()
        return scoring_pb2.OutcomeAck(accepted=len(request.outcomes))

    async def StreamOutcomes(self, request_iterator: Any, context: Any) -> scoring_pb2.OutcomeAck:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not used by the router")
        raise AssertionError("unreachable")

    async def wait_outcomes(self, count: int) -> list[scoring_pb2.Outcome]:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: len(self.outcomes) >= count)
        return list(self.outcomes)


class FakeState(state_pb2_grpc.StateServicer):
    """Only ListModelStates, which is what the router calls."""

    def __init__(self) -> None:
        self.states: list[types_pb2.ModelState] = []

    async def ListModelStates(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.ModelStateList:
        return state_pb2.ModelStateList(states=self.states)


def model_state(model: str, endpoint: str, loaded: bool = True) -> types_pb2.ModelState:
    return types_pb2.ModelState(
        key=types_pb2.TargetKey(model=model, node="node", endpoint=endpoint),
        version=1,
        fields=types_pb2.ModelStateFields(loaded=loaded, healthy=True),
    )


@contextlib.asynccontextmanager
async def fake_agent(socket_path: Path) -> AsyncIterator[tuple[FakeScoring, FakeState, Any]]:
    # FakeState implements only the State method the router calls.
    scoring, state = FakeScoring(), FakeState()  # type: ignore[abstract]
    health = health_aio.HealthServicer()
    await health.set("infermesh.v1.Scoring", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServicer_to_server(scoring, server)
    state_pb2_grpc.add_StateServicer_to_server(state, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        yield scoring, state, health
    finally:
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


def _sse(event: dict[str, Any]) -> bytes:
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
        await response.write(_sse(_chunk(route, model, "Hel")))
        if self.mode == "die":
            assert request.transport is not None
            request.transport.abort()
            return response
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT_S):
                await self.release_rest.wait()
        self.sent_last = True
        await response.write(_sse(_chunk(route, model, "lo")))
        usage = {**_final(route, model), "choices": []}
        await response.write(_sse(usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# ----------------------------------------------------------------------------- router


@contextlib.asynccontextmanager
async def running_router(agent_target: str) -> AsyncIterator[str]:
    """The router app under uvicorn on a free loopback port; yields its base URL."""
    app = RouterApp(
        AgentClient(agent_target, timeout_s=2.0, models_cache_s=0.0),
        {"openai-http": openai_http_transport},
        RouterSettings(max_body_bytes=MAX_BODY_BYTES, max_attempts=2, retry_after_s=1.0),
    )
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
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await main_loop
        await server.shutdown(sockets=[sock])
        sock.close()


def plain_http_client(base_url: str = "") -> httpx2.AsyncClient:
    """An HTTP client for loopback URLs; without TLS it skips loading CA certificates, which
    takes long enough on a loaded machine to trip the blocked-loop detector."""
    return httpx2.AsyncClient(base_url=base_url, timeout=WAIT_S, verify=False)


@attrs.define
class Mesh:
    agent: FakeScoring
    state: FakeState
    health: Any
    a: FakeRuntime
    b: FakeRuntime
    url: str
    http: httpx2.AsyncClient
    openai: openai.AsyncOpenAI
    workdir: Path


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket_path = Path(workdir) / "agent.sock"
        a, b = FakeRuntime("a"), FakeRuntime("b")
        await a.start()
        await b.start()
        try:
            async with (
                fake_agent(socket_path) as (scoring, state, health),
                running_router(f"unix://{socket_path}") as url,
                plain_http_client(base_url=url) as http,
                plain_http_client() as openai_http,
            ):
                client = openai.AsyncOpenAI(
                    base_url=f"{url}/v1", api_key="test", max_retries=0, http_client=openai_http
                )
                scoring.routes["m"] = [a.endpoint, b.endpoint]
                try:
                    yield Mesh(scoring, state, health, a, b, url, http, client, Path(workdir))
                finally:
                    await client.close()
        finally:
            await a.stop()
            await b.stop()


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}


def _warm_up_openai_client() -> None:
    """Run every openai-client path the tests use once, against canned responses, at import.

    The client imports modules and builds models lazily on first use; with no bytecode cache
    (PYTHONDONTWRITEBYTECODE) that takes long enough, inside a test's loop, to trip the
    blocked-loop detector, which is there to catch the router blocking, not the client.
    """

    def answer(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        if path.endswith("/models"):
            return httpx2.Response(200, json={"object": "list", "data": []})
        if path.endswith("/missing"):
            return httpx2.Response(404, json={"error": {"message": "no"}})
        payload = orjson.loads(request.content)
        if payload.get("stream"):
            sse = _sse(_chunk(path, "m", "x")) + b"data: [DONE]\n\n"
            return httpx2.Response(200, content=sse, headers={"content-type": "text/event-stream"})
        return httpx2.Response(200, json=_final(path, "m"))

    async def exercise() -> None:
        transport = httpx2.MockTransport(answer)
        async with httpx2.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(
                base_url="http://warm.invalid/v1", api_key="x", max_retries=0, http_client=http
            )
            messages: Any = [{"role": "user", "content": "x"}]
            await client.chat.completions.create(model="m", messages=messages)
            chat = await client.chat.completions.create(model="m", messages=messages, stream=True)
            _ = [chunk async for chunk in chat]
            await client.completions.create(model="m", prompt="x")
            text = await client.completions.create(model="m", prompt="x", stream=True)
            _ = [chunk async for chunk in text]
            await client.models.list()
            with contextlib.suppress(openai.NotFoundError):
                await client.get("/missing", cast_to=object)

    asyncio.run(exercise())


_warm_up_openai_client()


def assert_openai_error(response: httpx2.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == error_type
    assert error["message"]
    return error


# ----------------------------------------------------------------------------- happy paths


@pytest.mark.anyio
async def test_streamed_chat_reaches_the_client_before_the_runtime_finishes(mesh: Mesh) -> None:
    mesh.agent.routes["m"] = [mesh.a.endpoint]
    mesh.a.release_rest.clear()
    stream = await mesh.openai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Say hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks: list[ChatCompletionChunk] = []
    async for chunk in stream:
        if not chunks:
            assert not mesh.a.sent_last, "the first chunk waited for the end of the stream"
            mesh.a.release_rest.set()
        chunks.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == 2
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert outcome.ok
    assert outcome.status == 200
    assert outcome.reservation_id == "res-1"
    assert outcome.target_id == f"node|{mesh.a.endpoint}|m"
    assert outcome.HasField("ttft_s")
    assert 0 < outcome.ttft_s <= outcome.latency_s
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (5, 2)


@pytest.mark.anyio
async def test_chat_and_completions_with_the_openai_client(mesh: Mesh) -> None:
    answer = await mesh.openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert answer.choices[0].message.content == "Hello"
    assert answer.usage is not None
    assert answer.usage.total_tokens == 7
    completion = await mesh.openai.completions.create(model="m", prompt="Say hello")
    assert completion.choices[0].text == "Hello"
    stream = await mesh.openai.completions.create(model="m", prompt="Say hello", stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "Hello"
    assert [r.path for r in mesh.a.received] == [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/completions",
    ]
    outcomes = await mesh.agent.wait_outcomes(3)
    assert all(o.ok for o in outcomes)
    assert not outcomes[0].HasField("ttft_s"), "TTFT is only reported for streamed requests"


@pytest.mark.anyio
async def test_original_body_bytes_and_trace_headers_are_forwarded(mesh: Mesh) -> None:
    body = b'{ "model" : "m",\n  "messages": [{"role": "user", "content": "caf\\u00e9"}] }'
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = await mesh.http.post(
        "/v1/chat/completions?trace=1",
        content=body,
        headers={
            "content-type": "application/json",
            "traceparent": traceparent,
            "x-request-id": "req-42",
            "x-infermesh-slo": "latency",
            "x-infermesh-tenant": "acme",
        },
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["x-runtime"] == "a"
    (received,) = mesh.a.received
    assert received.body == body
    assert received.path == "/v1/chat/completions?trace=1"
    assert received.headers["traceparent"] == traceparent
    assert received.headers["x-request-id"] == "req-42"
    features = mesh.agent.score_requests[-1].request
    assert features.slo_class == types_pb2.SLO_CLASS_LATENCY
    assert (features.tenant, features.request_id, features.model) == ("acme", "req-42", "m")
    assert features.prefix_key != 0
    assert features.prompt_tokens == 1  # "café": 4 characters


@pytest.mark.anyio
async def test_a_request_id_is_generated_when_absent_and_returned(mesh: Mesh) -> None:
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    request_id = response.headers["x-request-id"]
    assert len(request_id) >= 16
    assert mesh.a.received[0].headers["x-request-id"] == request_id
    assert mesh.agent.score_requests[-1].request.request_id == request_id


# ----------------------------------------------------------------------------- retries


@pytest.mark.anyio
async def test_connection_refused_falls_back_to_the_next_target_with_a_new_reservation(
    mesh: Mesh,
) -> None:
    dead = closed_port_endpoint()
    mesh.agent.routes["m"] = [dead, mesh.b.endpoint]
    answer = await mesh.openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert answer.choices[0].message.content == "Hello"
    assert [a.target_id for a in mesh.agent.admits] == [f"node|{mesh.b.endpoint}|m"]
    failed, served = await mesh.agent.wait_outcomes(2)
    assert (failed.ok, failed.status, failed.reservation_id) == (False, 0, "res-1")
    assert dead in failed.error
    assert (served.ok, served.status, served.reservation_id) == (True, 200, "adm-1")


@pytest.mark.anyio
async def test_a_5xx_before_any_body_is_retried_on_the_next_target(mesh: Mesh) -> None:
    mesh.a.mode = "error500"
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.headers["x-runtime"] == "b"
    failed, served = await mesh.agent.wait_outcomes(2)
    assert (failed.ok, failed.status) == (False, 500)
    assert served.ok


@pytest.mark.anyio
async def test_502_when_every_target_refuses_the_connection(mesh: Mesh) -> None:
    first, second = closed_port_endpoint(), closed_port_endpoint()
    mesh.agent.routes["m"] = [first, second]
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 502, "server_error")
    assert error["code"] == "upstream_failed"
    assert first in error["message"]
    assert second in error["message"]
    assert all(not o.ok for o in await mesh.agent.wait_outcomes(2))


@pytest.mark.anyio
async def test_502_when_every_target_answers_500(mesh: Mesh) -> None:
    mesh.a.mode = mesh.b.mode = "error500"
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 502, "server_error")
    assert "HTTP 500" in error["message"]
    assert "engine dead" in error["message"]


@pytest.mark.anyio
async def test_a_runtime_dying_mid_stream_ends_the_stream_with_an_error_event(mesh: Mesh) -> None:
    mesh.a.mode = "die"
    async with mesh.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.status_code == 200
        text = (await r.aread()).decode()
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert orjson.loads(events[0])["choices"][0]["delta"]["content"] == "Hel"
    error = orjson.loads(events[1])["error"]
    assert error["type"] == "server_error"
    assert error["code"] == "upstream_interrupted"
    assert events[2:] == ["[DONE]"]
    assert mesh.b.received == [], "nothing is retried once bytes were relayed"
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert not outcome.ok
    assert "mid-response" in outcome.error


# ----------------------------------------------------------------------------- errors


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "body", "headers", "param", "fragment"),
    [
        ("/v1/chat/completions", b"{oops", {}, None, "not valid JSON"),
        ("/v1/chat/completions", b'{"messages": []}', {}, "model", "'model' is required"),
        ("/v1/chat/completions", b'{"model": 3, "messages": []}', {}, "model", "string"),
        ("/v1/chat/completions", b'{"model": "m", "messages": {}}', {}, "messages", "list"),
        ("/v1/completions", b'{"model": "m"}', {}, "prompt", "'prompt' is required"),
        ("/v1/chat/completions", orjson.dumps(CHAT), {"x-infermesh-slo": "gold"}, None, "slo"),
    ],
)
async def test_bad_requests_get_400_in_openai_error_json(
    mesh: Mesh, path: str, body: bytes, headers: dict[str, str], param: str | None, fragment: str
) -> None:
    response = await mesh.http.post(path, content=body, headers=headers)
    error = assert_openai_error(response, 400, "invalid_request_error")
    assert error["param"] == param
    assert fragment in error["message"]
    assert response.headers["x-request-id"]
    assert mesh.a.received == []


@pytest.mark.anyio
async def test_unknown_model_is_404_telling_how_to_list_models(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await mesh.openai.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert "GET /v1/models" in caught.value.message
    response = await mesh.http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert (error["code"], error["param"]) == ("model_not_found", "model")


@pytest.mark.anyio
async def test_no_healthy_target_is_503_with_retry_after(mesh: Mesh) -> None:
    mesh.agent.routes["m"] = []
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503, "server_error")
    assert error["code"] == "no_healthy_target"
    assert "telemetry stale" in error["message"]
    assert response.headers["retry-after"] == "3"


@pytest.mark.anyio
async def test_body_over_the_limit_is_413_with_content_length(mesh: Mesh) -> None:
    body = orjson.dumps({**CHAT, "pad": "x" * MAX_BODY_BYTES})
    response = await mesh.http.post("/v1/chat/completions", content=body)
    error = assert_openai_error(response, 413, "invalid_request_error")
    assert "router.max_body_bytes" in error["message"]
    assert mesh.agent.score_requests == []


@pytest.mark.anyio
async def test_body_over_the_limit_is_413_without_content_length(mesh: Mesh) -> None:
    async def chunked_body() -> AsyncIterator[bytes]:
        yield b'{"model": "m", "pad": "'
        for _ in range(8):
            yield b"x" * 1024
        yield b'"}'

    response = await mesh.http.post("/v1/chat/completions", content=chunked_body())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert_openai_error(response, 413, "invalid_request_error")
    assert mesh.agent.score_requests == []


@pytest.mark.anyio
async def test_wrong_method_is_405_with_allow_and_unknown_path_is_404(mesh: Mesh) -> None:
    response = await mesh.http.get("/v1/chat/completions")
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "POST"
    response = await mesh.http.post("/v1/models", json={})
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "GET"
    response = await mesh.http.get("/v1/embeddings")
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert "POST /v1/chat/completions" in error["message"]


@pytest.mark.anyio
async def test_unreachable_agent_gives_503_with_retry_after_and_unhealthy_health() -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        target = f"unix://{workdir}/missing.sock"
        async with running_router(target) as url, plain_http_client(base_url=url) as http:
            response = await http.post("/v1/chat/completions", json=CHAT)
            error = assert_openai_error(response, 503, "server_error")
            assert error["code"] == "agent_unavailable"
            assert target in error["message"]
            assert "infermesh agent run" in error["message"]
            assert response.headers["retry-after"] == "1"
            health = await http.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unavailable"
            assert target in health.json()["reason"]
            models = await http.get("/v1/models")
            assert_openai_error(models, 503, "server_error")


# ----------------------------------------------------------------------------- local endpoints


@pytest.mark.anyio
async def test_models_lists_the_union_of_loaded_models_in_openai_format(mesh: Mesh) -> None:
    mesh.state.states = [
        model_state("m", mesh.a.endpoint),
        model_state("m", mesh.b.endpoint),
        model_state("lora-sql", mesh.b.endpoint),
        model_state("unloaded", mesh.a.endpoint, loaded=False),
    ]
    page = await mesh.openai.models.list()
    assert [model.id for model in page.data] == ["lora-sql", "m"]
    raw = (await mesh.http.get("/v1/models")).json()
    assert raw["object"] == "list"
    assert raw["data"][0] == {
        "id": "lora-sql",
        "object": "model",
        "created": 0,
        "owned_by": "infermesh",
    }


@pytest.mark.anyio
async def test_health_follows_the_agents_grpc_health(mesh: Mesh) -> None:
    response = await mesh.http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    await mesh.health.set("infermesh.v1.Scoring", health_pb2.HealthCheckResponse.NOT_SERVING)
    response = await mesh.http.get("/health")
    assert response.status_code == 503
    assert "NOT_SERVING" in response.json()["reason"]


@pytest.mark.anyio
async def test_metrics_count_requests_by_route_and_status(mesh: Mesh) -> None:
    await mesh.http.post("/v1/chat/completions", json=CHAT)
    await mesh.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await mesh.http.post("/v1/chat/completions", content=b"{oops")
    text = (await mesh.http.get("/metrics")).text
    assert 'infermesh_router_requests_total{route="chat",status="200"} 2.0' in text
    assert 'infermesh_router_requests_total{route="chat",status="400"} 1.0' in text
    assert 'infermesh_router_ttft_seconds_count{route="chat"} 1.0' in text
    assert 'infermesh_router_upstream_latency_seconds_count{route="chat"} 2.0' in text
    assert "infermesh_router_agent_score_latency_seconds_count 2.0" in text
    assert 'infermesh_router_requests_in_progress{route="chat"} 0.0' in text


@pytest.mark.anyio
async def test_a_client_leaving_mid_stream_stops_the_relay_without_blaming_the_runtime(
    mesh: Mesh,
) -> None:
    mesh.agent.routes["m"] = [mesh.a.endpoint]
    mesh.a.release_rest.clear()
    async with mesh.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        async for _ in r.aiter_raw():
            break  # leave after the first chunk; closing the stream drops the connection
    mesh.a.release_rest.set()
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert (outcome.ok, outcome.status, outcome.error) == (True, 499, "client disconnected")


@pytest.mark.anyio
async def test_upstream_connections_are_pooled_across_requests(mesh: Mesh) -> None:
    mesh.agent.routes["m"] = [mesh.a.endpoint]
    for _ in range(3):
        assert (await mesh.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    stream = {**CHAT, "stream": True}
    for _ in range(2):
        assert (await mesh.http.post("/v1/chat/completions", json=stream)).status_code == 200
    assert len({received.peer for received in mesh.a.received}) == 1


@pytest.mark.anyio
async def test_an_empty_runtime_response_is_relayed_complete(mesh: Mesh) -> None:
    mesh.a.mode = "empty"
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["x-runtime"] == "a"

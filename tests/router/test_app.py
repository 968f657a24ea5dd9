"""The router end to end in one process, in both scoring modes: uvicorn serving the app, a fake
agent on a real UDS, and tiny aiohttp runtimes on 127.0.0.1, driven with the real `openai`
client and httpx. The harness is in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson
import pytest
from grpc_health.v1 import health_pb2
from openai.types.chat import ChatCompletionChunk

from infermesh.core.proto import types_pb2
from infermesh.core.scoring.engine import RETRY_UNAVAILABLE_S
from infermesh.router.local_scoring import LocalScoring

from .conftest import (
    MAX_BODY_BYTES,
    MODES,
    Mesh,
    _chunk,
    _final,
    closed_port_endpoint,
    make_scoring,
    plain_http_client,
    running_router,
    sse,
    target_id,
)

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
            events = sse(_chunk(path, "m", "x")) + b"data: [DONE]\n\n"
            headers = {"content-type": "text/event-stream"}
            return httpx2.Response(200, content=events, headers=headers)
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
    await mesh.route("m", [mesh.a.endpoint])
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
    assert outcome.reservation_id.startswith("res-" if mesh.mode == "agent" else "router-")
    assert outcome.target_id == target_id("m", mesh.a.endpoint)
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
    # The same trace and flags; the router's hop is a new parent (span) id.
    version, trace_id, span_id, flags = received.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert len(span_id) == 16
    assert span_id != "00f067aa0ba902b7"
    assert received.headers["x-request-id"] == "req-42"
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert outcome.request_id == "req-42"
    if mesh.mode == "agent":
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
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert outcome.request_id == request_id


# ----------------------------------------------------------------------------- retries


@pytest.mark.anyio
async def test_connection_refused_falls_back_to_the_next_target_with_a_new_reservation(
    mesh: Mesh,
) -> None:
    dead = closed_port_endpoint()
    await mesh.route("m", [dead, mesh.b.endpoint])
    answer = await mesh.openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert answer.choices[0].message.content == "Hello"
    failed, served = await mesh.agent.wait_outcomes(2)
    assert (failed.ok, failed.status) == (False, 0)
    assert dead in failed.error
    assert (served.ok, served.status) == (True, 200)
    assert served.target_id == target_id("m", mesh.b.endpoint)
    if mesh.mode == "agent":
        assert [a.target_id for a in mesh.agent.admits] == [target_id("m", mesh.b.endpoint)]
        assert (failed.reservation_id, served.reservation_id) == ("res-1", "adm-1")
    else:
        assert mesh.agent.admits == [], "local mode reserves in the router"
        assert failed.reservation_id != served.reservation_id
        assert isinstance(mesh.app.scoring, LocalScoring)
        assert mesh.app.scoring.inflight.open_count() == 0, "every reservation was released"


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
    await mesh.route("m", [first, second])
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
    await mesh.route("m", [])
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503, "server_error")
    assert error["code"] == "no_healthy_target"
    assert "telemetry stale" in error["message"]
    # Agent mode relays the agent's hint (2.5 s); local mode gives the engine's own.
    expected_s = 2.5 if mesh.mode == "agent" else RETRY_UNAVAILABLE_S
    assert response.headers["retry-after"] == str(math.ceil(expected_s))


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
    response = await mesh.http.get("/v1/audio/speech")
    error = assert_openai_error(response, 404, "invalid_request_error")
    assert "POST /v1/chat/completions" in error["message"]
    assert "POST /v1/embeddings" in error["message"]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_unreachable_agent_gives_503_with_retry_after_and_unhealthy_health(
    mode: str,
) -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        target = f"unix://{workdir}/missing.sock"
        async with (
            running_router(make_scoring(mode, target)) as (url, _),
            plain_http_client(base_url=url) as http,
        ):
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
    agent = mesh.agent
    await mesh.publish(
        agent.state_of("lora-sql", mesh.b.endpoint),
        agent.state_of("unloaded", mesh.a.endpoint, loaded=False),
    )
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
async def test_health_follows_the_agents_grpc_health_in_agent_mode(agent_mesh: Mesh) -> None:
    mesh = agent_mesh
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
    score_latency = f"infermesh_router_{mesh.mode}_score_latency_seconds_count 2.0"
    assert score_latency in text
    assert 'infermesh_router_requests_in_progress{route="chat"} 0.0' in text


@pytest.mark.anyio
async def test_a_client_leaving_mid_stream_stops_the_relay_without_blaming_the_runtime(
    mesh: Mesh,
) -> None:
    await mesh.route("m", [mesh.a.endpoint])
    mesh.a.release_rest.clear()
    async with mesh.http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        async for _ in r.aiter_raw():
            break  # leave after the first chunk; closing the stream drops the connection
    mesh.a.release_rest.set()
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert (outcome.ok, outcome.status, outcome.error) == (True, 499, "client disconnected")


@pytest.mark.anyio
async def test_upstream_connections_are_pooled_across_requests(mesh: Mesh) -> None:
    await mesh.route("m", [mesh.a.endpoint])
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

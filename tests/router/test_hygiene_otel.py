"""OpenTelemetry spans (router.http.otel): one server span per forwarded request, child of the
client's trace, whose span id is the parent the runtime sees in `traceparent` — checked against
a fake runtime and against the emulated vLLM server's record of what it served (`/dev/traces`)."""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infermesh.dev.profiles import get_profile
from infermesh.dev.vllm_emulator import EmulatorConfig, start_emulator
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.plugin import openai_http_transport
from infermesh.router.server import uvicorn_config
from infermesh.router.tracing import parse

from .conftest import (
    FakeRuntime,
    make_scoring,
    plain_http_client,
    replica_holds,
    serving_fake_agent,
    wait_until,
)
from .protocols_support import CHAT, MODEL

pytestmark = pytest.mark.anyio

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def tracer_provider() -> None:
    """The process-wide provider (OpenTelemetry allows setting it once)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def traced_router_to(endpoint: str) -> AsyncIterator[str]:
    """A router with `router.http.otel` on, routing MODEL to `endpoint`; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="im-otel-", dir="/tmp") as workdir:
        socket_path = Path(workdir) / "agent.sock"
        async with serving_fake_agent(socket_path) as (agent, _health):
            app = RouterApp(
                make_scoring("local", f"unix://{socket_path}"),
                {"openai-http": openai_http_transport},
                RouterSettings(otel=True),
            )
            assert app.tracer.enabled
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            config = uvicorn_config(app, "127.0.0.1", port, "warning")
            config.load()
            server = uvicorn.Server(config)
            server.lifespan = config.lifespan_class(config)
            await server.startup(sockets=[sock])
            try:
                versions = agent.route(MODEL, [endpoint])
                await wait_until(lambda: replica_holds(app, versions), "the route")
                yield f"http://127.0.0.1:{port}"
            finally:
                await server.shutdown(sockets=[sock])
                sock.close()


@contextlib.asynccontextmanager
async def traced_router() -> AsyncIterator[tuple[str, FakeRuntime]]:
    runtime = FakeRuntime("a")
    await runtime.start()
    try:
        async with traced_router_to(runtime.endpoint) as url:
            yield url, runtime
    finally:
        await runtime.stop()


async def test_a_forwarded_request_is_a_server_span_in_the_clients_trace() -> None:
    EXPORTER.clear()
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with traced_router() as (url, runtime), plain_http_client(url) as client:
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"traceparent": incoming}
        )
        assert response.status_code == 200
        upstream = parse(runtime.received[-1].headers["traceparent"])
    assert upstream is not None
    (span,) = [s for s in EXPORTER.get_finished_spans() if s.name == "chat"]
    assert span.kind == trace.SpanKind.SERVER
    context = span.get_span_context()
    assert context is not None
    assert f"{context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    # The runtime's parent is the router's span.
    assert upstream.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert upstream.span_id == f"{context.span_id:016x}"
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["route"] == "/v1/chat/completions"


def router_spans() -> list[tuple[str, str, str]]:
    """(name, trace id, span id) of the router's finished server spans, in hex as in W3C."""
    out = []
    for span in EXPORTER.get_finished_spans():
        context = span.get_span_context()
        if span.kind == trace.SpanKind.SERVER and context is not None:
            out.append((span.name, f"{context.trace_id:032x}", f"{context.span_id:016x}"))
    return out


async def test_the_emulated_vllm_serves_each_request_in_the_routers_span() -> None:
    EXPORTER.clear()
    client_trace = "0af7651916cd43dd8448eb211c80319c"
    incoming = f"00-{client_trace}-b7ad6b7169203331-01"
    emulator = await start_emulator(EmulatorConfig(model=MODEL, profile=get_profile("instant")))
    try:
        async with traced_router_to(emulator.url) as url, plain_http_client(url) as client:
            # No trace context from the client: the router's span starts the trace.
            first = await client.post("/v1/chat/completions", json=CHAT)
            assert first.status_code == 200
            # A streamed request in the client's trace, with vendor state.
            second = await client.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True},
                headers={"traceparent": incoming, "tracestate": "vendor=1"},
            )
            assert second.status_code == 200
            assert "data: [DONE]" in second.text
            served = (await client.get(f"{emulator.url}/dev/traces")).json()["requests"]
    finally:
        await emulator.aclose()
    assert [request["path"] for request in served] == ["/v1/chat/completions", "/v1/completions"]
    spans = router_spans()
    assert [name for name, _, _ in spans] == ["chat", "completions"]
    for (_, trace_id, span_id), request in zip(spans, served, strict=True):
        upstream = parse(request["traceparent"])
        assert upstream is not None, request
        # The runtime served the request as a child of the router's span, in its trace.
        assert (upstream.trace_id, upstream.span_id) == (trace_id, span_id)
    assert spans[1][1] == client_trace
    assert spans[0][1] != client_trace
    assert served[1]["tracestate"] == "vendor=1"
    assert served[0]["tracestate"] == ""


async def test_the_emulators_trace_record_is_empty_before_any_request() -> None:
    emulator = await start_emulator(EmulatorConfig(model=MODEL, profile=get_profile("instant")))
    try:
        async with plain_http_client(emulator.url) as client:
            response = await client.get("/dev/traces")
    finally:
        await emulator.aclose()
    assert response.status_code == 200
    assert response.json() == {"requests": []}

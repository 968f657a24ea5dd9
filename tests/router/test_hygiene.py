"""Hygiene: API keys, CORS, content types, request-head limits, trace context (pure and served)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import openai
import orjson
import pytest

from infermesh.core.config import ConfigError, RouterHttpConfig
from infermesh.router import tracing
from infermesh.router.errors import ApiError
from infermesh.router.hygiene import Gate, check_content_type, load_api_keys, view_of

from .conftest import WAIT_S, plain_http_client
from .protocols_support import CHAT, running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ----------------------------------------------------------------------------- pure checks


def test_api_keys_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-a\n\n  sk-b  \n")
    assert load_api_keys(str(path)) == {"sk-a", "sk-b"}


@pytest.mark.parametrize("content", [None, "# only a comment\n\n"])
def test_api_keys_file_missing_or_empty_names_the_key(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=r"router\.http\.api_keys_file"):
        load_api_keys(str(path))


def _authorize(gate: Gate, path: str, authorization: bytes | None) -> ApiError | None:
    headers = [] if authorization is None else [(b"authorization", authorization)]
    try:
        gate.authorize(path, view_of(headers))
    except ApiError as error:
        return error
    return None


def test_gate_accepts_known_bearer_keys_and_exempt_paths() -> None:
    gate = Gate.build(["sk-good"], ["/health"], [])
    assert _authorize(gate, "/v1/chat/completions", b"Bearer sk-good") is None
    assert _authorize(gate, "/v1/chat/completions", b"bearer  sk-good") is None
    assert _authorize(gate, "/health", None) is None
    for header, says in [
        (None, "didn't provide an API key"),
        (b"Bearer sk-bad", "Incorrect API key"),
        (b"Basic c2stZ29vZA==", "Bearer <key>"),
        (b"Bearer ", "Bearer <key>"),
    ]:
        error = _authorize(gate, "/v1/models", header)
        assert error is not None
        assert (error.status, error.code) == (401, "invalid_api_key")
        assert says in error.message


def test_gate_without_keys_lets_everything_through() -> None:
    gate = Gate.build([], ["/health"], [])
    assert not gate.active
    assert _authorize(gate, "/v1/models", None) is None


def test_cors_preflight_and_response_headers() -> None:
    cors = Gate.build([], [], ["https://app.example"]).cors
    status, headers = cors.preflight("https://app.example", "content-type")
    assert status == 204
    named = dict(headers)
    assert named[b"access-control-allow-origin"] == b"https://app.example"
    assert b"POST" in named[b"access-control-allow-methods"]
    assert named[b"access-control-allow-headers"] == b"content-type"
    assert cors.preflight("https://evil.example", "")[0] == 403
    assert cors.response_headers("https://evil.example") == []
    assert (
        dict(Gate.build([], [], ["*"]).cors.response_headers("https://x"))[
            b"access-control-allow-origin"
        ]
        == b"*"
    )


@pytest.mark.parametrize(
    "content_type", [b"", b"application/json", b"application/json; charset=utf-8", b"a/b+json"]
)
def test_json_content_types_are_accepted(content_type: bytes) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/x-www-form-urlencoded"])
def test_other_content_types_are_415(content_type: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        check_content_type(content_type)
    assert refused.value.status == 415
    assert "application/json" in refused.value.message


def _counter() -> tracing.RandomBytes:
    def random_bytes(n: int) -> bytes:
        return bytes(range(1, n + 1))

    return random_bytes


def test_traceparent_keeps_the_trace_and_flags_with_a_new_span() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
    out = tracing.outgoing(incoming, _counter())
    assert out.header() == "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-00"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ],
)
def test_an_invalid_traceparent_starts_a_new_trace(bad: str) -> None:
    assert tracing.parse(bad) is None
    out = tracing.outgoing(bad, _counter())
    assert out.header() == "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01"


def test_a_future_traceparent_version_is_read_by_its_first_fields() -> None:
    parsed = tracing.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")
    assert parsed is not None
    assert parsed.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_tracer_off_without_the_setting() -> None:
    tracer = tracing.Tracer(enabled=False)
    assert not tracer.enabled
    assert tracer.start("chat", None, {}) is None


# ----------------------------------------------------------------------------- served


async def test_api_keys_refuse_openai_clients_without_the_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-good\n")
    async with running(http=RouterHttpConfig(api_keys_file=str(keys))) as router:
        async with plain_http_client() as http_client:
            wrong = openai.AsyncOpenAI(
                base_url=f"{router.url}/v1",
                api_key="sk-bad",
                max_retries=0,
                http_client=http_client,
            )
            with pytest.raises(openai.AuthenticationError) as refused:
                await wrong.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
            assert refused.value.code == "invalid_api_key"
            good = openai.AsyncOpenAI(
                base_url=f"{router.url}/v1",
                api_key="sk-good",
                max_retries=0,
                http_client=http_client,
            )
            answer = await good.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
            assert answer.choices[0].message.content
        # The router's key is not the runtime's business.
        assert "authorization" not in router.a.received[-1].headers
        async with plain_http_client(router.url) as http:
            assert (await http.get("/health")).status_code == 200
            response = await http.get("/v1/models")
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "invalid_api_key"


async def test_cors_preflight_and_allowed_origin_headers() -> None:
    http = RouterHttpConfig(cors_origins=["https://app.example"])
    async with running(http=http) as router, plain_http_client(router.url) as client:
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        response = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"origin": "https://app.example"}
        )
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        other = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers
        refused = await client.options(
            "/v1/chat/completions",
            headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
        )
        assert refused.status_code == 403


async def test_request_id_and_traceparent_are_generated_and_sent_upstream() -> None:
    async with running() as router, plain_http_client(router.url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        received = router.a.received[-1]
        assert received.headers["x-request-id"] == response.headers["x-request-id"]
        parsed = tracing.parse(received.headers["traceparent"])
        assert parsed is not None
        assert parsed.flags == "01"


async def _raw_exchange(url: str, payload: bytes, *, slow: bool = False) -> bytes:
    """Write `payload` (a byte at a time every 50 ms when `slow`); what the server answers
    before closing. Reads as data arrives, so a reset after the answer loses nothing."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received: list[bytes] = []

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.append(chunk)

    reading = asyncio.create_task(read_all())
    try:
        for piece in [bytes([byte]) for byte in payload] if slow else [payload]:
            if reading.done():
                break
            writer.write(piece)
            try:
                await writer.drain()
            except ConnectionError:
                break
            if slow:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(WAIT_S):
            await reading
        return b"".join(received)
    finally:
        reading.cancel()
        writer.close()


async def test_slow_request_heads_are_cut_off_with_408() -> None:
    http = RouterHttpConfig(header_timeout_s=0.5)
    async with running(http=http) as router:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 200
        answer = await _raw_exchange(router.url, head, slow=True)
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"router.http.header_timeout_s" in answer
        async with plain_http_client(router.url) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_oversized_request_heads_get_431(server: str) -> None:
    http = RouterHttpConfig(max_header_bytes=2048)
    async with running(server, http=http) as router:
        head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n"
        answer = await _raw_exchange(router.url, head)
        assert answer.startswith(b"HTTP/1.1 431")
        body = orjson.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_header_fields_too_large"
        async with plain_http_client(router.url) as client:
            assert (await client.get("/health")).status_code == 200


async def test_hypercorn_closes_slow_request_heads() -> None:
    http = RouterHttpConfig(header_timeout_s=0.5)
    async with running("hypercorn", http=http) as router:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 400
        # Hypercorn closes the connection without an answer; the router keeps serving.
        assert await _raw_exchange(router.url, head, slow=True) == b""
        async with plain_http_client(router.url) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_a_flood_of_idle_connections_is_shed_and_the_router_recovers() -> None:
    # The header timeout is long enough that the flood still holds every slot when the
    # client's request arrives, even on a loaded machine; WAIT_S covers the wait for it.
    http = RouterHttpConfig(max_connections=16, header_timeout_s=3.0)
    async with running(http=http) as router:
        host, port = router.url.removeprefix("http://").split(":")
        flood = [await asyncio.open_connection(host, int(port)) for _ in range(40)]
        try:
            async with plain_http_client(router.url) as client:
                busy = await client.get("/health")
                assert busy.status_code == 503
                # The idle connections never send a request head: the router closes them.
                async with asyncio.timeout(WAIT_S):
                    for reader, _writer in flood:
                        assert await reader.read() == b""
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        finally:
            for _reader, writer in flood:
                writer.close()

"""Ingress protocols: HTTP/1.1 and HTTP/2 (h2c and TLS/ALPN) on one port, WebSocket streaming."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx2
import orjson
import pytest
import websockets
from websockets.asyncio.client import ClientConnection, connect

from infermesh.core.config import RouterHttpConfig

from .conftest import WAIT_S
from .protocols_support import CHAT, running

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(url: str, *, http1: bool = True, http2: bool = False) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(base_url=url, http1=http1, http2=http2, verify=False, timeout=WAIT_S)


async def _stream_text(client: httpx2.AsyncClient) -> tuple[str, str]:
    """(HTTP version, concatenated content) of a streamed chat request."""
    body = {**CHAT, "stream": True}
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        version = response.http_version
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = orjson.loads(line[len("data: ") :])
                for choice in chunk["choices"]:
                    text += choice["delta"].get("content") or ""
    return version, text


async def test_hypercorn_serves_http1_and_h2c_on_the_same_port() -> None:
    async with (
        running("hypercorn") as router,
        _client(router.url, http1=False, http2=True) as h2,
        _client(router.url) as h1,
    ):
        response = await h2.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.http_version == "HTTP/2"
        assert response.headers["x-request-id"]
        assert await _stream_text(h2) == ("HTTP/2", "Hello")
        response = await h1.post("/v1/chat/completions", json=CHAT)
        assert (response.status_code, response.http_version) == (200, "HTTP/1.1")
        # Errors are the same OpenAI JSON over HTTP/2.
        bad = await h2.post("/v1/chat/completions", json={"model": MODEL_MISSING})
        assert bad.status_code == 400
        assert bad.json()["error"]["type"] == "invalid_request_error"


MODEL_MISSING = ""


async def test_hypercorn_negotiates_h2_over_tls_by_alpn() -> None:
    async with (
        running("hypercorn", tls=True) as router,
        _client(router.url, http2=True) as h2,
        _client(router.url) as h1,
    ):
        assert router.url.startswith("https://")
        assert await _stream_text(h2) == ("HTTP/2", "Hello")
        response = await h1.post("/v1/chat/completions", json=CHAT)
        assert (response.status_code, response.http_version) == (200, "HTTP/1.1")


async def test_uvicorn_serves_https_with_the_configured_certificate() -> None:
    async with running("uvicorn", tls=True) as router, _client(router.url) as h1:
        response = await h1.post("/v1/chat/completions", json=CHAT)
        assert (response.status_code, response.http_version) == (200, "HTTP/1.1")


async def _ws_request(ws: ClientConnection, body: object) -> list[dict[str, Any]]:
    """Send one request; the messages up to and including the terminal done/error message."""
    await ws.send(orjson.dumps(body).decode())
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        while True:
            message = orjson.loads(await ws.recv())
            messages.append(message)
            if message.get("type") in ("done", "error"):
                return messages


@pytest.mark.parametrize("server", ["uvicorn", "hypercorn"])
async def test_websocket_streams_chunks_then_done_and_survives_errors(server: str) -> None:
    async with (
        running(server) as router,
        connect(f"{router.ws_url}/v1/ws/chat/completions") as ws,
    ):
        messages = await _ws_request(ws, CHAT)
        *chunks, done = messages
        assert done["type"] == "done"
        assert done["request_id"]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text == "Hello"
        assert all(c["object"] == "chat.completion.chunk" for c in chunks if c["choices"])
        # The router forwarded a streamed request with its request id.
        received = router.a.received[-1]
        assert orjson.loads(received.body)["stream"] is True
        assert received.headers["x-request-id"] == done["request_id"]

        (error,) = await _ws_request(ws, {"model": "m"})
        assert error["type"] == "error"
        assert error["status"] == 400
        assert error["error"]["param"] == "messages"

        await ws.send("not json")
        error = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
        assert (error["type"], error["status"]) == ("error", 400)
        assert "not valid JSON" in error["error"]["message"]

        # The connection still serves requests after errors.
        assert (await _ws_request(ws, CHAT))[-1]["type"] == "done"


async def test_websocket_unknown_path_is_refused() -> None:
    async with running() as router:
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with connect(f"{router.ws_url}/v1/ws/nope"):
                pass


async def test_websocket_close_mid_stream_closes_the_upstream_request() -> None:
    async with running() as router:
        router.a.release_rest.clear()  # the runtime holds its stream after the first chunk
        async with connect(f"{router.ws_url}/v1/ws/chat/completions") as ws:
            await ws.send(orjson.dumps(CHAT).decode())
            first = orjson.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert first["choices"][0]["delta"]["content"] == "Hel"
        gauge = router.app.metrics.in_progress_by_route["ws"]
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while gauge.value > 0:
            assert asyncio.get_running_loop().time() < deadline, "ws request still in flight"
            await asyncio.sleep(0.02)
        # The router let go of the upstream request without waiting for the runtime's rest.
        assert not router.a.sent_last
        router.a.release_rest.set()


async def test_websocket_needs_the_api_key_when_keys_are_configured(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# router keys\nsk-good\n")
    http = RouterHttpConfig(api_keys_file=str(keys))
    async with running(http=http) as router:
        with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
            async with connect(f"{router.ws_url}/v1/ws/chat/completions"):
                pass
        assert refused.value.response.status_code == 403
        headers = {"Authorization": "Bearer sk-good"}
        async with connect(
            f"{router.ws_url}/v1/ws/chat/completions", additional_headers=headers
        ) as ws:
            assert (await _ws_request(ws, CHAT))[-1]["type"] == "done"


async def test_hypercorn_upgrades_http1_to_h2c() -> None:
    async with running("hypercorn") as router:
        host, port = router.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"GET /health HTTP/1.1\r\nhost: router\r\n"
                b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
                b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
            )
            await writer.drain()
            async with asyncio.timeout(WAIT_S):
                status_line = await reader.readline()
        finally:
            writer.close()
        assert status_line.startswith(b"HTTP/1.1 101")


async def test_websocket_from_an_origin_outside_cors_origins_is_refused() -> None:
    http = RouterHttpConfig(cors_origins=["https://app.example"])
    async with running(http=http) as router:
        url = f"{router.ws_url}/v1/ws/chat/completions"
        with pytest.raises(websockets.exceptions.InvalidStatus):
            async with connect(url, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        async with connect(url, origin="https://app.example") as ws:  # type: ignore[arg-type]
            assert (await _ws_request(ws, CHAT))[-1]["type"] == "done"

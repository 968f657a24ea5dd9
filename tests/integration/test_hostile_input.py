"""Hostile input against a real router process: truncated, oversized, non-UTF-8 and non-JSON
bodies, slow senders and a flood of connections; after each the router answers a good request."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx2
import orjson
import pytest

from infermesh.dev.harness import LocalMesh, ReplicaSpec

from .conftest import MODEL, spec

pytestmark = pytest.mark.anyio

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
TIMEOUT_S = 20.0
MAX_BODY = 4096


@pytest.fixture(scope="module")
async def mesh() -> AsyncIterator[LocalMesh]:
    env = (
        ("INFERMESH_ROUTER__MAX_BODY_BYTES", str(MAX_BODY)),
        ("INFERMESH_ROUTER__HTTP__HEADER_TIMEOUT_S", "1"),
        ("INFERMESH_ROUTER__HTTP__BODY_TIMEOUT_S", "1"),
        ("INFERMESH_ROUTER__HTTP__MAX_HEADER_BYTES", "4096"),
    )
    async with LocalMesh(spec(ReplicaSpec("instant", "r1"), env=env)) as running:
        yield running


async def _good_request_answered(mesh: LocalMesh) -> None:
    assert mesh.exited() is None, "a mesh process exited"
    async with httpx2.AsyncClient(base_url=mesh.router_url, timeout=TIMEOUT_S) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]


async def _raw(mesh: LocalMesh, payload: bytes, *, byte_delay_s: float = 0.0) -> bytes:
    """Send `payload` on a fresh connection (a byte at a time with `byte_delay_s`), then read
    what the router answers until it closes; reading runs alongside so nothing is lost."""
    host, port = mesh.router_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    received: list[bytes] = []

    async def read_all() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                received.append(chunk)

    reading = asyncio.create_task(read_all())
    try:
        pieces = [bytes([b]) for b in payload] if byte_delay_s else [payload]
        for piece in pieces:
            if reading.done():
                break
            writer.write(piece)
            try:
                await writer.drain()
            except ConnectionError:
                break
            if byte_delay_s:
                await asyncio.sleep(byte_delay_s)
        if not byte_delay_s:
            with contextlib.suppress(OSError):
                writer.write_eof()
        async with asyncio.timeout(TIMEOUT_S):
            await reading
        return b"".join(received)
    finally:
        reading.cancel()
        writer.close()


def _status_and_error(answer: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, orjson.loads(body)["error"] if body else {}


def _request(body: bytes, content_type: bytes = b"application/json", length: int = -1) -> bytes:
    declared = len(body) if length < 0 else length
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: router\r\nconnection: close\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(declared).encode() + b"\r\n\r\n" + body
    )


async def test_truncated_body_then_close(mesh: LocalMesh) -> None:
    body = orjson.dumps(CHAT)
    # The connection ends half-way through the declared body: no answer is owed.
    await _raw(mesh, _request(body[:10], length=len(body)))
    await _good_request_answered(mesh)


async def test_truncated_body_left_open_is_a_408(mesh: LocalMesh) -> None:
    body = orjson.dumps(CHAT)
    host, port = mesh.router_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_request(body[:10], length=len(body)))
        await writer.drain()
        async with asyncio.timeout(TIMEOUT_S):
            # The whole answer (`connection: close`): head and body may arrive in two reads.
            answer = await reader.read()
    finally:
        writer.close()
    status, error = _status_and_error(answer)
    assert (status, error["code"]) == (408, "request_timeout")
    assert "router.http.body_timeout_s" in str(error["message"])
    await _good_request_answered(mesh)


async def test_oversized_body_is_413(mesh: LocalMesh) -> None:
    big = orjson.dumps({**CHAT, "pad": "x" * (2 * MAX_BODY)})
    async with httpx2.AsyncClient(base_url=mesh.router_url, timeout=TIMEOUT_S) as client:
        response = await client.post(
            "/v1/chat/completions", content=big, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 1024):
                yield big[start : start + 1024]

        chunked = await client.post(
            "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
    await _good_request_answered(mesh)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"model": "\xff\xfe", "messages": []}', "not valid JSON"),
        (b'{"model": ', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "body is empty"),
    ],
)
async def test_invalid_bodies_are_400(mesh: LocalMesh, body: bytes, says: str) -> None:
    status, error = _status_and_error(await _raw(mesh, _request(body)))
    assert status == 400
    assert says in str(error["message"])
    await _good_request_answered(mesh)


async def test_wrong_content_type_is_415(mesh: LocalMesh) -> None:
    body = orjson.dumps(CHAT)
    status, error = _status_and_error(await _raw(mesh, _request(body, b"text/plain")))
    assert (status, error["code"]) == (415, "unsupported_media_type")
    await _good_request_answered(mesh)


async def test_slow_header_sender_is_cut_off(mesh: LocalMesh) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: router\r\nx-slow: " + b"a" * 100
    answer = await _raw(mesh, head, byte_delay_s=0.05)
    assert answer.startswith(b"HTTP/1.1 408")
    await _good_request_answered(mesh)


async def test_oversized_headers_are_431(mesh: LocalMesh) -> None:
    head = b"GET /health HTTP/1.1\r\nhost: router\r\nx-big: " + b"a" * 6000 + b"\r\n\r\n"
    status, error = _status_and_error(await _raw(mesh, head))
    assert (status, error["code"]) == (431, "request_header_fields_too_large")
    await _good_request_answered(mesh)


async def test_a_flood_of_connections_leaves_the_router_serving(mesh: LocalMesh) -> None:
    host, port = mesh.router_url.removeprefix("http://").split(":")
    flood = []
    try:
        for _ in range(300):
            flood.append(await asyncio.open_connection(host, int(port)))
        # Half of them start a request and stall; the router keeps serving others meanwhile.
        for _reader, writer in flood[::2]:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: r")
        await _good_request_answered(mesh)
    finally:
        for _reader, writer in flood:
            writer.close()
    await _good_request_answered(mesh)

"""The `openai-http` transport against raw HTTP/1.1 servers: framing, keep-alive pooling,
timeouts and failures, on both asyncio's loop and uvloop (which the router serves on).

Each server is a few lines of asyncio streams answering exactly the bytes a test needs, so the
client meets what real runtimes send: Content-Length, chunked and close-delimited bodies,
interim responses, connections that drop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from infermesh.core.contracts import TransportContext, UpstreamError
from infermesh.router.transport import OpenAIHttpTransport

from .conftest import wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return "asyncio", {"debug": True, "use_uvloop": request.param == "uvloop"}


pytestmark = pytest.mark.anyio


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


class Server:
    """A loopback server running `handler` per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await self.handler(reader, writer)
        writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        yield server
    finally:
        listener.close()


@contextlib.asynccontextmanager
async def transport(read_timeout_s: float = 10.0) -> AsyncIterator[OpenAIHttpTransport]:
    context = TransportContext(connect_timeout_s=2.0, read_timeout_s=read_timeout_s)
    client = OpenAIHttpTransport(context)
    try:
        yield client
    finally:
        await client.aclose()


def keep_alive_json(server: Server) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            server.heads.append(head)
            answer = b'{"echo": ' + str(len(body)).encode() + b"}"
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer
            )
            await writer.drain()

    return handle


async def test_requests_reuse_one_pooled_connection_and_send_the_body_unchanged() -> None:
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_alive_json(holder[0])(reader, writer)

    async with serving(handle) as server, transport() as client:
        holder.append(server)
        for body in (b'{"a": 1}', b"x" * 100_000):
            response = await client.request(
                "POST", server.url, [("traceparent", "00-1"), ("host", "spoofed")], body
            )
            assert response.status == 200
            assert ("content-type", "application/json") in response.headers
            assert await response.read() == b'{"echo": ' + str(len(body)).encode() + b"}"
            response.release()
    assert server.connections == 1
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "traceparent: 00-1\r\n" in head
    assert f"host: {server.url.split('/')[2]}\r\n" in head
    assert "spoofed" not in head


async def test_a_chunked_stream_arrives_chunk_by_chunk() -> None:
    second = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + b"7\r\ndata: 1\r\n"
        )
        await writer.drain()
        await second.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with serving(handle) as server, transport() as client:
        response = await client.request("POST", server.url, [], b"{}")
        chunks = response.chunks()
        assert await anext(chunks) == b"data: 1"
        second.set()
        assert [chunk async for chunk in chunks] == [b"data: 2"]
        response.release()


async def test_a_body_without_length_ends_when_the_runtime_closes() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with serving(handle) as server, transport() as client:
        response = await client.request("POST", server.url, [], b"{}")
        assert await response.read() == b"all of it"
        response.release()


async def test_an_interim_100_continue_is_skipped() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-id: 7\r\n\r\nok"
        )
        await writer.drain()
        await reader.read()

    async with serving(handle) as server, transport() as client:
        response = await client.request("POST", server.url, [], b"{}")
        assert (response.status, dict(response.headers)["x-id"]) == (201, "7")
        assert await response.read() == b"ok"
        response.release()


async def test_a_connection_dropped_before_the_response_is_an_upstream_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)

    async with serving(handle) as server, transport() as client:
        with pytest.raises(UpstreamError, match="closed before the response"):
            await client.request("POST", server.url, [], b"{}")


async def test_a_connection_dropped_mid_body_fails_the_body() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async with serving(handle) as server, transport() as client:
        response = await client.request("POST", server.url, [], b"{}")
        chunks = response.chunks()
        assert await anext(chunks) == b"partial"
        with pytest.raises(UpstreamError, match="body interrupted"):
            await anext(chunks)
        response.release()


async def test_a_refused_connection_and_a_silent_runtime_are_upstream_errors() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()

    async with serving(silent) as server, transport(read_timeout_s=0.2) as client:
        with pytest.raises(UpstreamError, match=r"timed out: nothing read for 0\.2 s"):
            await client.request("POST", server.url, [], b"{}")
    closed = server.url  # the listener is closed now
    async with transport() as client:
        with pytest.raises(UpstreamError, match="ConnectionRefusedError"):
            await client.request("POST", closed, [], b"{}")


async def test_a_pooled_connection_the_runtime_closed_is_replaced() -> None:
    closed = asyncio.Event()

    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        # ... then close the keep-alive connection, as a runtime does when it idles out.
        writer.close()
        await writer.wait_closed()
        closed.set()

    async with serving(one_answer) as server, transport() as client:
        for _ in range(3):
            closed.clear()
            response = await client.request("POST", server.url, [], b"{}")
            assert await response.read() == b"ok"
            response.release()
            await closed.wait()
            await wait_until_idle_connections_closed(client)
    assert server.connections == 3


async def wait_until_idle_connections_closed(client: OpenAIHttpTransport) -> None:
    """Until the client has seen the runtime close its pooled connections."""
    pool = client._pool
    assert pool is not None
    await wait_until(
        lambda: all(conn.closed for conns in pool._idle.values() for conn in conns),
        "the pooled connection to be seen closed",
    )


async def test_an_unread_body_closes_the_connection_instead_of_pooling_it() -> None:
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_alive_json(holder[0])(reader, writer)

    async with serving(handle) as server, transport() as client:
        holder.append(server)
        for _ in range(2):
            response = await client.request("POST", server.url, [], b"{}")
            response.release()  # without reading the body
    assert server.connections == 2


async def test_requests_over_the_connection_limit_wait_for_a_slot() -> None:
    holder: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await keep_alive_json(holder[0])(reader, writer)

    context = TransportContext(connect_timeout_s=2.0, read_timeout_s=10.0, max_connections=1)
    client = OpenAIHttpTransport(context)

    async def one(body: bytes) -> bytes:
        response = await client.request("POST", holder[0].url, [], body)
        try:
            return await response.read()
        finally:
            response.release()

    try:
        async with serving(handle) as server:
            holder.append(server)
            async with asyncio.timeout(10):
                answers = await asyncio.gather(*(one(b"x" * n) for n in range(1, 6)))
    finally:
        await client.aclose()
    assert answers == [b'{"echo": ' + str(n).encode() + b"}" for n in range(1, 6)]

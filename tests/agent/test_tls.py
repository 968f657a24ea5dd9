"""Mutual TLS on a real grpc.aio server on loopback: a client with a certificate from our CA gets
through and the server sees its identity; a client without one, or with one from another CA, is
refused quickly with a clear gRPC status."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.tls import (
    CALLER,
    ClientIdentityInterceptor,
    TLSFileError,
    channel_credentials,
    server_credentials,
)

pytestmark = pytest.mark.anyio

WHO = "/infermesh.test.Probe/Who"
WATCH = "/infermesh.test.Probe/Watch"
DEADLINE_S = 5.0


async def _who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    identity = CALLER.get()
    return f"{identity.name} {identity.role}".encode()


async def _watch(
    request: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> AsyncIterator[bytes]:
    for index in range(2):
        yield f"{CALLER.get().name} {index}".encode()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_ca_dir(tmp_path, days=2)
    issue_to_dir(tmp_path, Identity("node-1", "node"), hosts=["127.0.0.1", "localhost"])
    issue_to_dir(tmp_path, Identity("alice", "operator"))
    other = tmp_path / "other"
    init_ca_dir(other, days=2)
    issue_to_dir(other, Identity("mallory", "admin"))
    return tmp_path


@pytest.fixture
async def server_address(pki: Path) -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ClientIdentityInterceptor()])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "infermesh.test.Probe",
                {
                    "Who": grpc.unary_unary_rpc_method_handler(_who),
                    "Watch": grpc.unary_stream_rpc_method_handler(_watch),
                },
            )
        ]
    )
    credentials = server_credentials(pki / "node-1.pem", pki / "node-1-key.pem", pki / "ca.pem")
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


async def _call_who(address: str, credentials: grpc.ChannelCredentials) -> bytes:
    async with grpc.aio.secure_channel(address, credentials) as channel:
        response: bytes = await channel.unary_unary(WHO)(b"", timeout=DEADLINE_S)
        return response


async def test_client_with_a_certificate_from_the_ca_is_seen_with_its_identity(
    pki: Path, server_address: str
) -> None:
    credentials = channel_credentials(pki / "ca.pem", pki / "alice.pem", pki / "alice-key.pem")
    assert await _call_who(server_address, credentials) == b"alice operator"
    async with grpc.aio.secure_channel(server_address, credentials) as channel:
        stream = channel.unary_stream(WATCH)(b"", timeout=DEADLINE_S)
        assert [message async for message in stream] == [b"alice 0", b"alice 1"]


async def test_node_certificate_also_works_as_a_client(pki: Path, server_address: str) -> None:
    credentials = channel_credentials(pki / "ca.pem", pki / "node-1.pem", pki / "node-1-key.pem")
    assert await _call_who(server_address, credentials) == b"node-1 node"


@pytest.mark.parametrize("client", ["none", "other-ca"])
async def test_client_without_a_trusted_certificate_is_refused_quickly(
    pki: Path, server_address: str, client: str
) -> None:
    if client == "none":
        credentials = channel_credentials(pki / "ca.pem")
    else:
        credentials = channel_credentials(
            pki / "ca.pem", pki / "other" / "mallory.pem", pki / "other" / "mallory-key.pem"
        )
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _call_who(server_address, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < DEADLINE_S


async def test_server_only_tls_call_gets_unauthenticated(pki: Path) -> None:
    """Without require_client_auth the handshake passes; the interceptor still refuses."""
    server = grpc.aio.server(interceptors=[ClientIdentityInterceptor()])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "infermesh.test.Probe", {"Who": grpc.unary_unary_rpc_method_handler(_who)}
            )
        ]
    )
    credentials = grpc.ssl_server_credentials(
        [((pki / "node-1-key.pem").read_bytes(), (pki / "node-1.pem").read_bytes())]
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call_who(f"127.0.0.1:{port}", channel_credentials(pki / "ca.pem"))
    finally:
        await server.stop(grace=None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in (refused.value.details() or "")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TLSFileError, match=r"CA certificate .*ca\.pem"):
        channel_credentials(tmp_path / "ca.pem")
    (tmp_path / "x.pem").write_text("hello")
    with pytest.raises(TLSFileError, match="not a PEM file"):
        server_credentials(tmp_path / "x.pem", tmp_path / "x.pem", tmp_path / "x.pem")
    with pytest.raises(TLSFileError, match="needs its key"):
        channel_credentials(tmp_path / "x.pem", cert_path=tmp_path / "x.pem")

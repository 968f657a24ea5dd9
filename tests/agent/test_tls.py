"""Mutual TLS on a real grpc.aio server on loopback: a client with a certificate from our CA gets
through and the server sees its identity; a client without one, or with one from another CA, is
refused quickly with a clear gRPC status."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

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


async def _start_probe_server(credentials: grpc.ServerCredentials) -> tuple[Any, str]:
    """A grpc.aio server with the identity interceptor and the Probe service on loopback."""
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
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def server_address(pki: Path) -> AsyncIterator[str]:
    credentials = server_credentials(pki / "node-1.pem", pki / "node-1-key.pem", pki / "ca.pem")
    server, address = await _start_probe_server(credentials)
    try:
        yield address
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
    credentials = grpc.ssl_server_credentials(
        [((pki / "node-1-key.pem").read_bytes(), (pki / "node-1.pem").read_bytes())]
    )
    server, address = await _start_probe_server(credentials)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _call_who(address, channel_credentials(pki / "ca.pem"))
        async with grpc.aio.secure_channel(address, channel_credentials(pki / "ca.pem")) as channel:
            stream = channel.unary_stream(WATCH)(b"", timeout=DEADLINE_S)
            with pytest.raises(grpc.aio.AioRpcError) as stream_refused:
                [message async for message in stream]
    finally:
        await server.stop(grace=None)
    for error in (refused.value, stream_refused.value):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no client certificate" in (error.details() or "")


def _external_ca_client(directory: Path) -> tuple[Path, Path]:
    """A client certificate made the way another PKI would: an RSA CA and only the URI SAN."""
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=1), now + datetime.timedelta(days=1))
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "whoever")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://infermesh/viewer/grafana")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle = directory / "bundle.pem"
    bundle.write_bytes(
        (directory / "ca.pem").read_bytes() + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    cert_path, key_path = directory / "grafana.pem", directory / "grafana-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_certificate_from_your_own_ca_is_accepted_when_the_bundle_trusts_it(
    pki: Path,
) -> None:
    """docs/certificates.md: any CA works when ca.pem holds its root and the SAN is ours."""
    cert_path, key_path = _external_ca_client(pki)
    credentials = server_credentials(pki / "node-1.pem", pki / "node-1-key.pem", pki / "bundle.pem")
    server, address = await _start_probe_server(credentials)
    try:
        client = channel_credentials(pki / "ca.pem", cert_path, key_path)
        assert await _call_who(address, client) == b"grafana viewer"
    finally:
        await server.stop(grace=None)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TLSFileError, match=r"CA certificate .*ca\.pem"):
        channel_credentials(tmp_path / "ca.pem")
    (tmp_path / "x.pem").write_text("hello")
    with pytest.raises(TLSFileError, match="not a PEM file"):
        server_credentials(tmp_path / "x.pem", tmp_path / "x.pem", tmp_path / "x.pem")
    with pytest.raises(TLSFileError, match="needs its key"):
        channel_credentials(tmp_path / "x.pem", cert_path=tmp_path / "x.pem")

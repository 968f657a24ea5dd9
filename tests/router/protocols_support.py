"""Routers for the protocol and hygiene tests: the app under uvicorn or hypercorn, with
`[router.http]` settings, in front of the fake agent and fake runtimes of conftest."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypercorn.asyncio import serve as hypercorn_serve

from infermesh.core.config import RouterHttpConfig
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.plugin import openai_http_transport
from infermesh.router.server import build_gate, hypercorn_app, hypercorn_config, uvicorn_config

from .conftest import (
    MAX_BODY_BYTES,
    FakeAgent,
    FakeRuntime,
    make_scoring,
    plain_http_client,
    replica_holds,
    serving_fake_agent,
    wait_until,
)

MODEL = "m"


def self_signed(directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost, and its key: (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "router.crt", directory / "router.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@attrs.define
class Router:
    url: str
    ws_url: str
    app: RouterApp
    agent: FakeAgent
    a: FakeRuntime
    workdir: Path


@contextlib.asynccontextmanager
async def _uvicorn(app: RouterApp, http: RouterHttpConfig) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn_config(app, "127.0.0.1", port, "warning", http)
    config.load()
    server = uvicorn.Server(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    assert server.started, "router did not start"
    main_loop = asyncio.create_task(server.main_loop())
    try:
        yield port
    finally:
        server.should_exit = True
        await main_loop
        await server.shutdown(sockets=[sock])
        sock.close()


@contextlib.asynccontextmanager
async def _hypercorn(app: RouterApp, http: RouterHttpConfig) -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = hypercorn_config(app, "127.0.0.1", port, http)
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket
    config.graceful_timeout = 1.0
    stop = asyncio.Event()
    asgi: object = hypercorn_app(app, config)
    task = asyncio.create_task(
        hypercorn_serve(asgi, config, shutdown_trigger=stop.wait, mode="asgi")  # type: ignore[arg-type]
    )
    try:
        yield port
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def running(
    server: str = "uvicorn", http: RouterHttpConfig | None = None, tls: bool = False
) -> AsyncIterator[Router]:
    """One fake runtime behind the router (local scoring) served by `server`."""
    with tempfile.TemporaryDirectory(prefix="im-proto-", dir="/tmp") as workdir:
        base = http if http is not None else RouterHttpConfig()
        if tls:
            cert, key = self_signed(Path(workdir))
            base = attrs.evolve(base, tls_cert=cert, tls_key=key)
        socket_path = Path(workdir) / "agent.sock"
        runtime = FakeRuntime("a")
        await runtime.start()
        try:
            async with serving_fake_agent(socket_path) as (agent, _health):
                app = RouterApp(
                    make_scoring("local", f"unix://{socket_path}"),
                    {"openai-http": openai_http_transport},
                    RouterSettings(max_body_bytes=MAX_BODY_BYTES, gate=build_gate(base)),
                )
                serve = _hypercorn if server == "hypercorn" else _uvicorn
                async with serve(app, base) as port:
                    scheme = "https" if tls else "http"
                    router = Router(
                        f"{scheme}://127.0.0.1:{port}",
                        f"{'wss' if tls else 'ws'}://127.0.0.1:{port}",
                        app,
                        agent,
                        runtime,
                        Path(workdir),
                    )
                    versions = agent.route(MODEL, [runtime.endpoint])
                    await wait_until(lambda: replica_holds(app, versions), "the route")
                    if server == "hypercorn":
                        await _wait_serving(router.url)
                    yield router
        finally:
            await runtime.stop()


async def _wait_serving(url: str) -> None:
    async with plain_http_client(url) as client:
        for _ in range(200):
            with contextlib.suppress(Exception):
                if (await client.get("/health")).status_code == 200:
                    return
            await asyncio.sleep(0.05)


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}

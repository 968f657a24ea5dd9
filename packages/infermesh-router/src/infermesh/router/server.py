"""Serves the router app until SIGTERM/SIGINT: uvicorn (HTTP/1.1) or hypercorn (HTTP/1.1 + HTTP/2).

The composition root of `infermesh router run`: builds the agent client, the scoring mode
(`router.scoring`), transports, the hygiene gate and app from `Config`, and the server
`router.server` names with the `[router.http]` limits. Never contains request logic.

On SIGTERM/SIGINT either server stops accepting connections, closes idle ones, lets requests and
streams in flight finish for up to `router.http.drain_timeout_s`, then closes what is left and
runs the app's shutdown.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig

from infermesh.core.config import Config, ConfigError, RouterHttpConfig, parse_host_port
from infermesh.core.contracts import Scorer, TransportFactory
from infermesh.core.logging import get_logger
from infermesh.core.scoring.engine import ScoringSetupError
from infermesh.router.agent_client import AgentClient
from infermesh.router.agent_scoring import AgentScoring
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.decision import RouteScoring
from infermesh.router.http_guard import guarded_protocol
from infermesh.router.hygiene import Gate, HeadLimit, load_api_keys
from infermesh.router.kserve import KServeSettings
from infermesh.router.kserve_grpc import grpc_targets_of
from infermesh.router.local_scoring import LocalScoring

__all__ = [
    "SCORING_MODES",
    "SERVERS",
    "build_app",
    "build_gate",
    "build_scoring",
    "hypercorn_app",
    "hypercorn_config",
    "serve",
    "uvicorn_config",
]

log = get_logger(__name__)

AGENT_TIMEOUT_S = 2.0
SCORING_MODES = ("local", "agent")
SERVERS = ("uvicorn", "hypercorn")


def runtime_transports(config: Config) -> dict[str, str]:
    """Runtime base URL -> transport plugin name, from `[[runtimes]]` (as the agent reads it)."""
    transports = {rt.url.rstrip("/"): rt.transport for rt in config.runtimes}
    transports.update({rt.url: rt.transport for rt in config.runtimes})
    return transports


def build_scoring(
    config: Config, agent: AgentClient, scorers: Mapping[str, Scorer] | None
) -> RouteScoring:
    """The scoring mode `router.scoring` names; raises ConfigError naming the bad key."""
    mode = config.router.scoring
    if mode == "agent":
        return AgentScoring(agent)
    if mode != "local":
        raise ConfigError(
            f"invalid value for 'router.scoring': {mode!r} "
            f"(expected one of {', '.join(map(repr, SCORING_MODES))})"
        )
    if scorers is None:
        raise ConfigError("router.scoring = 'local' needs the registered scorers")
    try:
        return LocalScoring(agent, scorers, config.scoring, transports=runtime_transports(config))
    except ScoringSetupError as exc:
        raise ConfigError(f"router.scoring = 'local': {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"scoring.outcome_ewma_alpha: {exc}") from None


def build_gate(http: RouterHttpConfig) -> Gate:
    """API keys (read from `api_keys_file` now; ConfigError naming it) and CORS origins."""
    keys = load_api_keys(http.api_keys_file) if http.api_keys_file else frozenset()
    return Gate.build(keys, http.auth_exempt_paths, http.cors_origins)


def build_app(
    config: Config,
    transport_factories: Mapping[str, TransportFactory],
    scorers: Mapping[str, Scorer] | None = None,
) -> RouterApp:
    """The app `infermesh router run` serves; `scorers` (by name) are needed in local mode."""
    router = config.router
    agent = AgentClient(
        config.agent_target(), timeout_s=AGENT_TIMEOUT_S, models_cache_s=router.models_cache_s
    )
    scoring = build_scoring(config, agent, scorers)
    settings = RouterSettings(
        max_body_bytes=router.max_body_bytes,
        max_attempts=router.max_attempts,
        retry_after_s=router.retry_after_s,
        connect_timeout_s=router.connect_timeout_s,
        read_timeout_s=router.read_timeout_s,
        gate=build_gate(router.http),
        otel=router.http.otel,
        body_timeout_s=router.http.body_timeout_s,
        kserve=KServeSettings(
            grpc_listen=router.grpc_listen,
            grpc_targets=grpc_targets_of(config.runtimes),
            max_attempts=router.max_attempts,
            retry_after_s=router.retry_after_s,
            max_body_bytes=router.max_body_bytes,
        ),
        admission=router.admission,
    )
    app = RouterApp(scoring, transport_factories, settings)
    # `[router.hedging]`, `[router.retries]`, `[router.breaker]` (docs/router.md).
    app.forwarder.configure(hedging=router.hedging, retries=router.retries, breaker=router.breaker)
    return app


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def uvicorn_config(
    app: RouterApp,
    host: str,
    port: int,
    log_level: str = "info",
    http: RouterHttpConfig | None = None,
) -> uvicorn.Config:
    """uvicorn with the `[router.http]` limits: head deadline and size, idle, connections, drain.

    Clients such as the openai SDK keep connections pooled; closing idle ones too early makes
    them race a reused connection against our close (hence `idle_timeout_s` = 30 by default).
    """
    http = http if http is not None else RouterHttpConfig()
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http=guarded_protocol(http.header_timeout_s, http.max_header_bytes),
        ws="websockets-sansio",
        ws_max_size=app.settings.max_body_bytes,
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=log_level,
        server_header=False,
        date_header=False,
        # The router never reads the client address; skipping the middleware saves a layer.
        proxy_headers=False,
        timeout_keep_alive=max(1, round(http.idle_timeout_s)),
        limit_concurrency=http.max_connections,
        timeout_graceful_shutdown=max(1, round(http.drain_timeout_s)),
        ssl_certfile=http.tls_cert or None,
        ssl_keyfile=http.tls_key or None,
        backlog=4096,
    )


def hypercorn_config(
    app: RouterApp, host: str, port: int, http: RouterHttpConfig | None = None
) -> HypercornConfig:
    """hypercorn serving HTTP/1.1 and HTTP/2 on one port with the `[router.http]` limits.

    Cleartext: h2c by prior knowledge or `Upgrade: h2c`. With TLS: h2 or http/1.1 by ALPN.
    Hypercorn has one idle timer that also covers reading the first request head, so the
    shorter of `header_timeout_s` and `idle_timeout_s` applies to both.
    """
    http = http if http is not None else RouterHttpConfig()
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.keep_alive_timeout = min(http.header_timeout_s, http.idle_timeout_s)
    config.h11_max_incomplete_size = http.max_header_bytes
    config.h2_max_header_list_size = http.max_header_bytes
    config.graceful_timeout = http.drain_timeout_s
    config.websocket_max_message_size = app.settings.max_body_bytes
    config.backlog = 4096
    config.include_server_header = False
    config.include_date_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    if http.tls_cert:
        config.certfile = http.tls_cert
        config.keyfile = http.tls_key
        config.alpn_protocols = ["h2", "http/1.1"]
    return config


def hypercorn_app(app: RouterApp, config: HypercornConfig) -> HeadLimit:
    """The app as hypercorn serves it: with the request-head size limit (`max_header_bytes`,
    which `hypercorn_config` also sets as h11's limit) checked per request, since hypercorn only
    limits heads still being received."""
    return HeadLimit(app, config.h11_max_incomplete_size)


async def serve_hypercorn(app: RouterApp, config: HypercornConfig) -> None:
    """Serve until SIGTERM/SIGINT, then drain (hypercorn's graceful_timeout)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    shutdown_trigger: Callable[..., Any] = stop.wait
    asgi: Any = hypercorn_app(app, config)
    await hypercorn_serve(asgi, config, shutdown_trigger=shutdown_trigger, mode="asgi")


def serve(
    config: Config,
    transport_factories: Mapping[str, TransportFactory],
    scorers: Mapping[str, Scorer] | None = None,
) -> None:
    """Run the router in this process until SIGTERM/SIGINT (`config` is already validated)."""
    server = config.router.server
    if server not in SERVERS:
        raise ConfigError(
            f"invalid value for 'router.server': {server!r} "
            f"(expected one of {', '.join(map(repr, SERVERS))})"
        )
    host, port = parse_host_port(config.router.listen)
    app = build_app(config, transport_factories, scorers)
    http = config.router.http
    scheme = "https" if http.tls_cert else "http"
    log.info(
        "router starting",
        listen=f"{scheme}://{host}:{port}",
        server=server,
        http2=server == "hypercorn",
        agent=config.agent_target(),
        scoring=config.router.scoring,
        transports=sorted(transport_factories),
    )
    if server == "hypercorn":
        hconfig = hypercorn_config(app, host, port, http)
        if _has_uvloop():
            import uvloop

            uvloop.run(serve_hypercorn(app, hconfig))
        else:
            asyncio.run(serve_hypercorn(app, hconfig))
        return
    uvicorn.Server(uvicorn_config(app, host, port, config.logging.level, http)).run()

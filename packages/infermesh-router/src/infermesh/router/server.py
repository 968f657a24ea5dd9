"""Serves the router app under uvicorn (uvloop + httptools, access log off) until a signal.

The composition root of `infermesh router run`: builds the agent client, transports and app from
`Config`. Never contains request logic; uvicorn handles SIGTERM/SIGINT and lifespan shutdown.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import uvicorn

from infermesh.core.config import Config, ConfigError, parse_host_port
from infermesh.core.contracts import TransportFactory
from infermesh.core.logging import get_logger
from infermesh.router.agent_client import AgentClient
from infermesh.router.app import RouterApp, RouterSettings

__all__ = ["build_app", "serve", "uvicorn_config"]

log = get_logger(__name__)

# Clients such as the openai SDK keep connections pooled; closing idle ones too early makes them
# race a reused connection against our close.
KEEP_ALIVE_S = 30
AGENT_TIMEOUT_S = 2.0


def build_app(config: Config, transport_factories: Mapping[str, TransportFactory]) -> RouterApp:
    router = config.router
    agent = AgentClient(
        config.agent_target(), timeout_s=AGENT_TIMEOUT_S, models_cache_s=router.models_cache_s
    )
    settings = RouterSettings(
        max_body_bytes=router.max_body_bytes,
        max_attempts=router.max_attempts,
        retry_after_s=router.retry_after_s,
        connect_timeout_s=router.connect_timeout_s,
        read_timeout_s=router.read_timeout_s,
    )
    return RouterApp(agent, transport_factories, settings)


def uvicorn_config(app: RouterApp, host: str, port: int, log_level: str = "info") -> uvicorn.Config:
    has_uvloop = importlib.util.find_spec("uvloop") is not None
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if has_uvloop else "asyncio",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level=log_level,
        server_header=False,
        date_header=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        backlog=4096,
    )


def serve(config: Config, transport_factories: Mapping[str, TransportFactory]) -> None:
    """Run the router in this process until SIGTERM/SIGINT (`config` is already validated)."""
    if config.router.server != "uvicorn":
        raise ConfigError(
            f"invalid value for 'router.server': {config.router.server!r} (expected 'uvicorn')"
        )
    host, port = parse_host_port(config.router.listen)
    app = build_app(config, transport_factories)
    log.info(
        "router starting",
        listen=f"http://{host}:{port}",
        agent=config.agent_target(),
        transports=sorted(transport_factories),
    )
    uvicorn.Server(uvicorn_config(app, host, port, config.logging.level)).run()

"""Serves the router app under uvicorn (uvloop + httptools, access log off) until a signal.

The composition root of `infermesh router run`: builds the agent client, the scoring mode
(`router.scoring`), transports and app from `Config`. Never contains request logic; uvicorn
handles SIGTERM/SIGINT and lifespan shutdown.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import uvicorn

from infermesh.core.config import Config, ConfigError, parse_host_port
from infermesh.core.contracts import Scorer, TransportFactory
from infermesh.core.logging import get_logger
from infermesh.core.scoring.engine import ScoringSetupError
from infermesh.router.agent_client import AgentClient
from infermesh.router.agent_scoring import AgentScoring
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.decision import RouteScoring
from infermesh.router.kserve import KServeSettings
from infermesh.router.kserve_grpc import grpc_targets_of
from infermesh.router.local_scoring import LocalScoring

__all__ = ["SCORING_MODES", "build_app", "build_scoring", "serve", "uvicorn_config"]

log = get_logger(__name__)

# Clients such as the openai SDK keep connections pooled; closing idle ones too early makes them
# race a reused connection against our close.
KEEP_ALIVE_S = 30
AGENT_TIMEOUT_S = 2.0
SCORING_MODES = ("local", "agent")


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
        kserve=KServeSettings(
            grpc_listen=router.grpc_listen,
            grpc_targets=grpc_targets_of(config.runtimes),
            max_attempts=router.max_attempts,
            retry_after_s=router.retry_after_s,
            max_body_bytes=router.max_body_bytes,
        ),
    )
    return RouterApp(scoring, transport_factories, settings)


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
        # The router never reads the client address; skipping the middleware saves a layer.
        proxy_headers=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        backlog=4096,
    )


def serve(
    config: Config,
    transport_factories: Mapping[str, TransportFactory],
    scorers: Mapping[str, Scorer] | None = None,
) -> None:
    """Run the router in this process until SIGTERM/SIGINT (`config` is already validated)."""
    if config.router.server != "uvicorn":
        raise ConfigError(
            f"invalid value for 'router.server': {config.router.server!r} (expected 'uvicorn')"
        )
    host, port = parse_host_port(config.router.listen)
    app = build_app(config, transport_factories, scorers)
    log.info(
        "router starting",
        listen=f"http://{host}:{port}",
        agent=config.agent_target(),
        scoring=config.router.scoring,
        transports=sorted(transport_factories),
    )
    uvicorn.Server(uvicorn_config(app, host, port, config.logging.level)).run()

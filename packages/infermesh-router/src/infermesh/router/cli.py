"""`infermesh router ...`: the router's command group.

Only option parsing and start-up errors live here; heavy modules (uvicorn, aiohttp, grpc) are
imported when a command runs so that `infermesh --help` stays fast.
"""

from __future__ import annotations

import click

from infermesh.core.config import ConfigError, load_config
from infermesh.core.logging import configure_logging
from infermesh.core.plugins import PluginHost, plugin_selection_from_env

__all__ = ["router_group"]


@click.group("router")
def router_group() -> None:
    """The InferMesh router: OpenAI-compatible ingress that routes on the local agent's scores."""


@router_group.command("run")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (default: $INFERMESH_CONFIG).",
)
@click.option("--listen", default=None, help="HTTP host:port to serve on [router.listen].")
@click.option(
    "--agent",
    default=None,
    help="gRPC target of the local agent, unix:///path.sock or host:port [router.agent].",
)
@click.option(
    "--max-body-bytes",
    type=int,
    default=None,
    help="Largest request body accepted; larger ones get 413 [router.max_body_bytes].",
)
@click.option(
    "--scoring",
    type=click.Choice(["local", "agent"]),
    default=None,
    help="Rank requests in the router on a replica of the agent's state (local) or with one "
    "ScoreTargets call to the agent per request (agent) [router.scoring].",
)
@click.option("--log-level", default=None, help="debug, info, warning, error [logging.level].")
@click.option("--log-format", default=None, help="auto, json or console [logging.format].")
@click.pass_context
def run_command(
    ctx: click.Context,
    config_path: str | None,
    listen: str | None,
    agent: str | None,
    max_body_bytes: int | None,
    scoring: str | None,
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    try:
        config = load_config(
            config_path,
            overrides=[
                ("router.listen", listen),
                ("router.agent", agent),
                ("router.max_body_bytes", max_body_bytes),
                ("router.scoring", scoring),
                ("logging.level", log_level),
                ("logging.format", log_format),
            ],
        )
        configure_logging(
            config.logging.level, config.logging.format, node=config.node.id, component="router"
        )
    except (ConfigError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    host = ctx.find_object(PluginHost)
    if host is None:
        allow, block = plugin_selection_from_env()
        host = PluginHost.load(allow=allow, block=block)

    from infermesh.router.server import serve

    try:
        serve(config, host.transports(), host.scorers())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None

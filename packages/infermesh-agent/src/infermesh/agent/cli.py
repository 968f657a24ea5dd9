"""`infermesh agent ...`: the node agent's commands.

Turns flags into config overrides, sets up logging and plugins, and hands over to the daemon.
Imports the daemon (gRPC, aiohttp) only when a command runs, so `infermesh --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

import click

from infermesh.core.config import Config, ConfigError, RuntimeConfig, load_config
from infermesh.core.logging import configure_logging
from infermesh.core.plugins import PluginError, PluginHost, plugin_selection_from_env

__all__ = ["agent_group", "parse_runtime_flag"]


def parse_runtime_flag(text: str) -> RuntimeConfig:
    """`KIND=URL` (e.g. `vllm=http://127.0.0.1:8000`) -> a runtimes entry."""
    kind, sep, url = text.partition("=")
    kind, url = kind.strip(), url.strip()
    if not sep or not kind or not url:
        raise click.BadParameter(
            f"expected KIND=URL (e.g. vllm=http://127.0.0.1:8000), got {text!r}",
            param_hint="'--runtime'",
        )
    return RuntimeConfig(kind=kind, url=url)


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"infermesh agent: error: {message}", err=True)
    raise SystemExit(code)


def _load_plugins(config: Config, root_strict: bool) -> PluginHost:
    env_allow, env_block = plugin_selection_from_env()
    return PluginHost.load(
        allow=env_allow or config.plugins.allow,
        block=sorted({*config.plugins.block, *env_block}),
        strict=config.plugins.strict or root_strict,
    )


@click.group("agent")
def agent_group() -> None:
    """The node agent: watches runtimes and GPUs and answers where requests should go."""


@agent_group.command("run")
@click.option("--config", "config_path", metavar="PATH", help="TOML config file.")
@click.option("--node-id", help="This node's id (config node.id).")
@click.option("--socket", "socket_path", metavar="PATH", help="Unix socket of the gRPC APIs.")
@click.option("--listen", metavar="HOST:PORT", help="Also serve the gRPC APIs on TCP.")
@click.option(
    "--metrics-listen", metavar="HOST:PORT", help="Prometheus /metrics address ('' disables)."
)
@click.option(
    "--runtime",
    "runtimes",
    metavar="KIND=URL",
    multiple=True,
    help="Watch a runtime (repeatable; added to the config's [[runtimes]]).",
)
@click.option("--log-level", help="debug, info, warning, error or critical.")
@click.option("--log-format", help="auto, json or console.")
@click.pass_context
def run_command(
    ctx: click.Context,
    config_path: str | None,
    node_id: str | None,
    socket_path: str | None,
    listen: str | None,
    metrics_listen: str | None,
    runtimes: Sequence[str],
    log_level: str | None,
    log_format: str | None,
) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    extra_runtimes = [parse_runtime_flag(text) for text in runtimes]
    overrides = [
        ("node.id", node_id),
        ("agent.socket", socket_path),
        ("agent.listen", listen),
        ("agent.metrics_listen", metrics_listen),
        ("logging.level", log_level),
        ("logging.format", log_format),
    ]
    try:
        config = load_config(config_path, overrides=overrides)
    except ConfigError as exc:
        _fail(str(exc))
    config.runtimes.extend(extra_runtimes)
    try:
        configure_logging(
            config.logging.level, config.logging.format, node=config.node.id, component="agent"
        )
    except ValueError as exc:
        _fail(f"logging: {exc}")
    root_strict = bool(ctx.find_root().params.get("strict_plugins", False))
    try:
        host = _load_plugins(config, root_strict)
    except PluginError as exc:
        _fail(str(exc))
    for failure in host.failures:
        click.echo(
            f"infermesh agent: warning: plugin {failure.name!r} skipped: {failure.error}", err=True
        )

    import anyio

    from infermesh.agent.daemon import Agent, AgentStartupError

    try:
        agent = Agent(config, host)
        anyio.run(agent.run)
    except AgentStartupError as exc:
        _fail(str(exc), code=1)

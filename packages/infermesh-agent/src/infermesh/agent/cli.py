"""`infermesh agent ...`: the node agent's commands.

Turns flags into config overrides, sets up logging and plugins, and hands over to the daemon.
Imports the daemon (gRPC, aiohttp) only when a command runs, so `infermesh --help` stays fast.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import click

from infermesh.core.config import (
    Config,
    ConfigError,
    RuntimeConfig,
    load_config,
    parse_host_port,
)
from infermesh.core.logging import configure_logging
from infermesh.core.plugins import PluginError, PluginHost, plugin_selection_from_env

__all__ = ["agent_group", "format_members", "parse_runtime_flag"]


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


# --------------------------------------------------------------------------- gossip


@agent_group.group("gossip")
def gossip_group() -> None:
    """The gossip mesh between agents: keys and members (docs/gossip.md)."""


@gossip_group.command("keygen")
def keygen_command() -> None:
    """Print a new random gossip key (base64 AES-256) for a gossip.key_file.

    \b
    infermesh agent gossip keygen > gossip.key
    """
    from infermesh.agent.gossip.keyring import generate_key

    click.echo(generate_key())


@gossip_group.command("members")
@click.option("--config", "config_path", metavar="PATH", help="TOML config of the agent to ask.")
@click.option(
    "--url",
    metavar="URL",
    help="The agent's HTTP address (default: http:// + agent.metrics_listen of the config).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the agent's JSON answer as it is.")
@click.option("--timeout", "timeout_s", default=5.0, show_default=True, help="Seconds to wait.")
def members_command(
    config_path: str | None, url: str | None, as_json: bool, timeout_s: float
) -> None:
    """List the mesh's members as a running agent sees them (GET /gossip/members)."""
    if url is None:
        url = _agent_http_url(config_path)
    body = _fetch_members(url.rstrip("/") + "/gossip/members", timeout_s)
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    click.echo(format_members(body))


def _agent_http_url(config_path: str | None) -> str:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(str(exc))
    if not config.agent.metrics_listen:
        _fail("agent.metrics_listen is empty: the agent serves no HTTP; pass --url")
    host, port = parse_host_port(config.agent.metrics_listen)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _fetch_members(url: str, timeout_s: float) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            detail = ""
        _fail(f"{url}: HTTP {exc.code} {detail or exc.reason}", code=1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail(f"cannot reach the agent at {url} ({reason}); is it running?", code=1)
    except ValueError:
        _fail(f"{url}: the answer is not JSON", code=1)
    if not isinstance(body, dict) or not isinstance(body.get("members"), list):
        _fail(f"{url}: unexpected answer (no members list)", code=1)
    return body


def format_members(body: Mapping[str, Any]) -> str:
    """The members document as an aligned table; this node is marked with `*`."""
    header = ("NODE", "STATE", "ADDRESS", "INCARNATION", "RTT_MS", "ZONE", "ROLES")
    rows = [header]
    for member in body.get("members", []):
        rtt_s = member.get("rtt_s")
        mark = "*" if member.get("node") == body.get("node") else ""
        rows.append(
            (
                f"{member.get('node', '?')}{mark}",
                str(member.get("state", "?")),
                str(member.get("address", "")),
                str(member.get("incarnation", "")),
                "-" if rtt_s is None else f"{rtt_s * 1000:.2f}",
                str(member.get("zone", "")) or "-",
                ",".join(member.get("roles", [])) or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )

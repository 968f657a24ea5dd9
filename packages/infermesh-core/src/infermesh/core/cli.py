"""The `infermesh` command: a click group whose subcommands come from plugins.

Every distribution adds its commands through `infermesh_register_commands`; this module only
builds the root, loads plugins (honouring --strict-plugins and the allow/block lists), reports
broken plugins on stderr and runs. It never imports a subcommand's dependencies itself.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from infermesh.core.config import ConfigError
from infermesh.core.plugins import (
    ENV_ALLOW,
    ENV_BLOCK,
    PluginError,
    PluginHost,
    plugin_selection_from_env,
)

__all__ = ["STRICT_PLUGINS_FLAG", "build_cli", "main"]

STRICT_PLUGINS_FLAG = "--strict-plugins"
# Exit status for bad usage, bad configuration and (under --strict-plugins) broken plugins.
EXIT_USAGE = 2


class ConfigurationError(click.ClickException):
    """A ConfigError raised by a subcommand, shown as `Error: <message>` with exit status 2."""

    exit_code = EXIT_USAGE


class _RootGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigurationError(str(exc)) from None


def _preparse_strict(argv: Sequence[str]) -> bool:
    """--strict-plugins must be known before plugins load, i.e. before click parses anything."""
    for arg in argv:
        if arg == "--":
            break
        if arg == STRICT_PLUGINS_FLAG:
            return True
        if not arg.startswith("-"):
            break
    return False


def build_cli(host: PluginHost) -> click.Group:
    """The root group with every plugin-registered command attached."""

    @click.group(
        cls=_RootGroup,
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )
    @click.option(
        STRICT_PLUGINS_FLAG,
        "strict_plugins",
        is_flag=True,
        help="Exit with status 2 if any plugin cannot be loaded (default: warn and skip it).",
    )
    @click.version_option(package_name="infermesh-core", prog_name="infermesh")
    @click.pass_context
    def root(ctx: click.Context, strict_plugins: bool) -> None:
        """InferMesh: a GPU- and network-aware inference mesh.

        Subcommands come from the installed InferMesh distributions and third-party plugins;
        `infermesh plugins` lists them. INFERMESH_PLUGINS / INFERMESH_PLUGINS_BLOCK (comma
        lists of plugin names) select which plugins load.
        """
        ctx.obj = host

    for command in host.commands().values():
        root.add_command(command)
    return root


def _warn(message: str) -> None:
    click.echo(f"infermesh: warning: {message}", err=True)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `infermesh` script; exits the process."""
    args = list(sys.argv[1:] if argv is None else argv)
    allow, block = plugin_selection_from_env()
    try:
        host = PluginHost.load(allow=allow, block=block, strict=_preparse_strict(args))
        root = build_cli(host)
    except PluginError as exc:
        click.echo(f"infermesh: error: {exc}", err=True)
        raise SystemExit(EXIT_USAGE) from None
    for failure in host.failures:
        _warn(
            f"plugin {failure.name!r} ({failure.value}) skipped: {failure.error} "
            f"(use {STRICT_PLUGINS_FLAG} to make this fatal)"
        )
    for name in host.unmatched_selection:
        _warn(f"plugin {name!r} named in {ENV_ALLOW}/{ENV_BLOCK} is not installed")
    root.main(args=args, prog_name="infermesh")

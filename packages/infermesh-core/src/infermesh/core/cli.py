"""The `infermesh` command: a click group whose subcommands come from plugins.

Every distribution adds its commands through `infermesh_register_commands`; this module only
builds the root, loads plugins (honouring --strict-plugins and the allow/block lists) and runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from infermesh.core.plugins import PluginError, PluginHost, plugin_selection_from_env

__all__ = ["build_cli", "main"]


def _preparse_strict(argv: Sequence[str]) -> bool:
    """--strict-plugins must be known before plugins load, i.e. before click parses anything."""
    for arg in argv:
        if arg == "--":
            break
        if arg == "--strict-plugins":
            return True
        if not arg.startswith("-"):
            break
    return False


def build_cli(host: PluginHost) -> click.Group:
    """The root group with every plugin-registered command attached."""

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.option("--strict-plugins", is_flag=True, help="Fail if any plugin cannot be loaded.")
    @click.version_option(package_name="infermesh-core", prog_name="infermesh")
    @click.pass_context
    def root(ctx: click.Context, strict_plugins: bool) -> None:
        """InferMesh: a GPU- and network-aware inference mesh.

        Subcommands come from the installed InferMesh distributions and third-party plugins;
        `infermesh plugins` lists them.
        """
        ctx.obj = host

    for command in host.commands().values():
        root.add_command(command)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    allow, block = plugin_selection_from_env()
    try:
        host = PluginHost.load(allow=allow, block=block, strict=_preparse_strict(args))
        root = build_cli(host)
    except PluginError as exc:
        click.echo(f"infermesh: {exc}", err=True)
        raise SystemExit(2) from None
    for failure in host.failures:
        click.echo(
            f"infermesh: warning: plugin {failure.name!r} ({failure.value}) skipped: "
            f"{failure.error} (use --strict-plugins to make this fatal)",
            err=True,
        )
    root.main(args=args, prog_name="infermesh")

"""`infermesh plugins`: what is installed (`list`, as a table or JSON) and `new` plugin packages.

`plugin_rows` turns a loaded PluginHost plus the installed entry points into one row per plugin
(pure); the commands only print. A plugin that failed to load is a row with its error, never a
crash of the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import attrs
import click

from infermesh.core import hookspecs
from infermesh.core.plugin_skeleton import PLUGIN_KINDS, SkeletonError, write_skeleton
from infermesh.core.plugins import ENV_ALLOW, ENV_BLOCK, PluginHost

__all__ = ["PluginRow", "plugin_rows", "plugins_group"]

HOOK_PREFIX = "infermesh_register_"
REGISTERED_AS = {
    "runtime": "runtime adapters",
    "gpu": "GPU adapters",
    "scorer": "scorers",
    "transport": "transports",
}
"""`plugins new --kind` -> the registrations a new plugin of that kind must not clash with."""


@attrs.frozen
class PluginRow:
    """One discovered plugin as `infermesh plugins list` shows it."""

    name: str
    status: str
    """`loaded`, `failed` (see `error`) or `not loaded` (left out by the allow/block lists)."""
    module: str
    distribution: str = ""
    version: str = ""
    hooks: tuple[str, ...] = ()
    """The hooks it implements, without the `infermesh_register_` prefix."""
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    """Kind (`runtime adapters`, `scorers`, ...) -> the names it registered there."""
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(
            self, value_serializer=lambda _i, _a, v: list(v) if isinstance(v, tuple) else v
        )


def _dist_of(entry_point: EntryPoint) -> tuple[str, str]:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return "", ""
    return str(dist.name), str(dist.version)


def plugin_rows(host: PluginHost, installed: Iterable[EntryPoint]) -> list[PluginRow]:
    """Every plugin of `host` (loaded, failed, left out), sorted by name, with its distribution.

    `installed` are the `infermesh` entry points; a plugin added directly (not through an entry
    point) has no distribution.
    """
    by_name: dict[str, EntryPoint] = {}
    for installed_point in installed:
        by_name.setdefault(installed_point.name, installed_point)
    registered: dict[str, dict[str, list[str]]] = {}
    for kind, names in host.registrations().items():
        for registered_name, plugin_name in sorted(names.items()):
            registered.setdefault(plugin_name, {}).setdefault(kind, []).append(registered_name)
    rows = []
    for name in host.plugin_names:
        plugin = host.pm.get_plugin(name)
        callers = host.pm.get_hookcallers(plugin) or []
        hooks = sorted(caller.name.removeprefix(HOOK_PREFIX) for caller in callers)
        entry_point = by_name.get(name)
        module = entry_point.value if entry_point else host.origins.get(name, name)
        rows.append(
            PluginRow(
                name,
                "loaded",
                module,
                *(_dist_of(entry_point) if entry_point else ("", "")),
                hooks=tuple(hooks),
                registered=registered.get(name, {}),
            )
        )
    for failure in host.failures:
        failed = by_name.get(failure.name)
        dist = _dist_of(failed) if failed else ("", "")
        rows.append(PluginRow(failure.name, "failed", failure.value, *dist, error=failure.error))
    for name in host.skipped:
        left_out = by_name.get(name)
        module, dist = (left_out.value, _dist_of(left_out)) if left_out else ("", ("", ""))
        rows.append(PluginRow(name, "not loaded", module, *dist))
    return sorted(rows, key=lambda row: row.name)


def _what(row: PluginRow) -> str:
    if row.status == "failed":
        return f"error: {row.error}"
    if row.status == "not loaded":
        return f"left out by {ENV_ALLOW} / {ENV_BLOCK}"
    parts = [f"{kind}: {', '.join(names)}" for kind, names in row.registered.items()]
    return "; ".join(parts) or "-"


def render_table(rows: Sequence[PluginRow]) -> list[str]:
    """The aligned table of `infermesh plugins list`."""
    header = ("NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS", "REGISTERED / ERROR")
    cells = [
        (
            row.name,
            row.distribution or "-",
            row.version or "-",
            row.status,
            ", ".join(row.hooks) or "-",
            _what(row),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header) - 1)]
    return [
        "  ".join(
            [*(cell.ljust(width) for cell, width in zip(line, widths, strict=False)), line[-1]]
        )
        for line in [header, *cells]
    ]


def show_overview(host: PluginHost) -> None:
    """`infermesh plugins` without a subcommand: loaded plugins, then what each kind holds."""
    click.echo("loaded plugins:")
    for name in host.plugin_names:
        click.echo(f"  {name:<16} {host.origins.get(name, '')}".rstrip())
    for kind, names in host.registrations().items():
        click.echo(f"{kind}:")
        if not names:
            click.echo("  (none)")
        for name, plugin in sorted(names.items()):
            click.echo(f"  {name:<24} from {plugin}")
    if host.failures:
        click.echo("failed (skipped):")
    for failure in host.failures:
        click.echo(f"  {failure.name:<16} {failure.value}: {failure.error}")
    if host.skipped:
        click.echo(f"not loaded ({ENV_ALLOW} / {ENV_BLOCK}):")
    for name in host.skipped:
        click.echo(f"  {name}")


@click.group("plugins", invoke_without_command=True)
@click.pass_context
def plugins_group(ctx: click.Context) -> None:
    """List loaded plugins, what each registered, and plugins that failed to load.

    `infermesh plugins list` shows one row per plugin with its distribution, version and hooks;
    `infermesh plugins new` writes a new plugin package.
    """
    if ctx.invoked_subcommand is None:
        show_overview(ctx.find_object(PluginHost) or PluginHost())


@plugins_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array, one object per plugin.")
@click.pass_context
def list_command(ctx: click.Context, as_json: bool) -> None:
    """Every discovered plugin: distribution, version, hooks, what it registered, load errors.

    A plugin that fails to import is listed with its error (status `failed`); plugins left out
    by INFERMESH_PLUGINS / INFERMESH_PLUGINS_BLOCK are listed as `not loaded`.
    """
    host = ctx.find_object(PluginHost) or PluginHost()
    rows = plugin_rows(host, entry_points(group=hookspecs.PROJECT))
    if as_json:
        click.echo(json.dumps([row.to_json() for row in rows], indent=2))
        return
    for line in render_table(rows):
        click.echo(line.rstrip())


@plugins_group.command("new")
@click.argument("name")
@click.option(
    "--kind",
    required=True,
    type=click.Choice(PLUGIN_KINDS),
    help="What the plugin provides: a runtime adapter, a GPU adapter, a scorer or a transport.",
)
@click.option(
    "--dir",
    "parent",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(),
    show_default="the current directory",
    help="Where to create the NAME directory.",
)
@click.pass_context
def new_command(ctx: click.Context, name: str, kind: str, parent: Path) -> None:
    """Write a new plugin package NAME (pyproject with entry point, module, README, tests).

    NAME is the distribution, entry-point and registered name (`acme-llm`); the package is
    NAME with `_` for `-`. Never overwrites: NAME must not exist in --dir. The generated tests
    pass as written: `cd NAME && python -m pytest`.
    """
    installed = {entry_point.name for entry_point in entry_points(group=hookspecs.PROJECT)}
    if name in installed:
        raise click.UsageError(f"a plugin named {name!r} is already installed; choose another NAME")
    host = ctx.find_object(PluginHost)
    taken = host.registrations().get(REGISTERED_AS[kind], {}) if host is not None else {}
    if name in taken:
        raise click.UsageError(
            f"{kind} {name!r} is already registered by plugin {taken[name]!r}; "
            "two plugins cannot register the same name, choose another NAME"
        )
    try:
        root = write_skeleton(name, kind, parent)
    except SkeletonError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(f"created {kind} plugin {name!r} in {root}")
    click.echo(f"next: cd {root} && python -m pytest  (its tests pass as generated)")
    click.echo("then: pip install -e . and `infermesh plugins list` shows it")

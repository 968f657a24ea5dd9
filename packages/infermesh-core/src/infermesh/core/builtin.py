"""Core's own plugin: the `infermesh plugins` command that shows what is installed."""

from __future__ import annotations

import click

from infermesh.core.hookspecs import RegisterCommand, hookimpl
from infermesh.core.plugins import PluginHost


@click.command("plugins")
@click.pass_obj
def plugins_command(host: PluginHost) -> None:
    """List loaded plugins, what each registered, and plugins that failed to load."""
    click.echo("loaded plugins: " + ", ".join(host.plugin_names))
    for kind, names in host.registrations().items():
        click.echo(f"{kind}:")
        for name, plugin in sorted(names.items()):
            click.echo(f"  {name:<24} from {plugin}")
    for failure in host.failures:
        click.echo(f"FAILED {failure.name} ({failure.value}): {failure.error}")
    for name in host.skipped:
        click.echo(f"skipped by allow/block list: {name}")


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    register(plugins_command)

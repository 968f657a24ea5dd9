"""Core's own plugin: the `infermesh plugins` command that shows what is installed.

Registered through the same hook as any third-party command; it only reads the PluginHost.
"""

from __future__ import annotations

import click

from infermesh.core.hookspecs import RegisterCommand, RegisterScorer, hookimpl
from infermesh.core.plugins import ENV_ALLOW, ENV_BLOCK, PluginHost


@click.command("plugins")
@click.pass_obj
def plugins_command(host: PluginHost) -> None:
    """List loaded plugins, what each registered, and plugins that failed to load."""
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


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    register(plugins_command)


@hookimpl
def infermesh_register_scorers(register: RegisterScorer) -> None:
    """The built-in scorers: queue (work left), KV-cache headroom, prefix affinity."""
    from infermesh.core.scoring.scorers import builtin_scorers

    for scorer in builtin_scorers():
        register(scorer)

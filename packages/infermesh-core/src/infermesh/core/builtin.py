"""Core's own plugin: the `infermesh plugins` group (what is installed, new plugin packages)
and the built-in scorers.

Registered through the same hook as any third-party command; `plugins` only reads the PluginHost.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterCommand, RegisterScorer, hookimpl
from infermesh.core.plugins_cli import plugins_group


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    register(plugins_group)


@hookimpl
def infermesh_register_scorers(register: RegisterScorer) -> None:
    """The built-in scorers: queue (work left), KV-cache headroom, prefix affinity."""
    from infermesh.core.scoring.scorers import builtin_scorers

    for scorer in builtin_scorers():
        register(scorer)

"""The agent's plugin: the built-in scorers and the `infermesh agent` command.

Registered through the same hooks a third-party distribution uses; nothing here does I/O, and
the command's heavy imports (gRPC, aiohttp) happen only when `agent run` starts.
"""

from __future__ import annotations

from infermesh.agent.scoring.scorers import builtin_scorers
from infermesh.core.hookspecs import RegisterCommand, RegisterScorer, hookimpl


@hookimpl
def infermesh_register_scorers(register: RegisterScorer) -> None:
    for scorer in builtin_scorers():
        register(scorer)


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    from infermesh.agent.cli import agent_group

    register(agent_group)

"""The agent's plugin: the `infermesh agent` command.

The built-in scorers live in infermesh-core (`infermesh.core.scoring`) and are registered by
core's plugin, so a router scoring locally has them without installing the agent. Nothing here
does I/O; the command's heavy imports (gRPC, aiohttp) happen only when `agent run` starts.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterCommand, hookimpl


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    from infermesh.agent.cli import agent_group

    register(agent_group)

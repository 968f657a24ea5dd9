"""infermesh-dev's plugin: the `infermesh dev` and `infermesh sim` groups and `infermesh demo`."""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterCommand, hookimpl
from infermesh.dev.cli import demo_command, dev_group
from infermesh.dev.sim.cli import sim_group


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    register(dev_group)
    register(demo_command)
    register(sim_group)

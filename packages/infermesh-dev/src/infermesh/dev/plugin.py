"""infermesh-dev's plugin: adds the `infermesh dev` group and the `infermesh demo` command."""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterCommand, hookimpl
from infermesh.dev.cli import demo_command, dev_group


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    register(dev_group)
    register(demo_command)

"""The agent's plugin: `infermesh agent`, `infermesh certs`, and the `local`, `raft` and
`remote` policy stores.

The built-in scorers live in infermesh-core (`infermesh.core.scoring`) and are registered by
core's plugin, so a router scoring locally has them without installing the agent. Nothing here
does I/O; the command's heavy imports (gRPC, aiohttp) happen only when `agent run` starts, and
PySyncObj only when a raft store is built.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterCommand, RegisterPolicyStore, hookimpl
from infermesh.core.policy import PolicyStore, PolicyStoreContext


@hookimpl
def infermesh_register_commands(register: RegisterCommand) -> None:
    from infermesh.agent.certs_cli import certs_group
    from infermesh.agent.cli import agent_group
    from infermesh.agent.ctl.events_cli import events_command
    from infermesh.agent.ctl.models_cli import models_group
    from infermesh.agent.ctl.nodes_cli import nodes_group
    from infermesh.agent.ctl.policy_cli import policy_group

    register(agent_group)
    register(certs_group)
    register(nodes_group)
    register(models_group)
    register(policy_group)
    register(events_command)


def local_policy_store(context: PolicyStoreContext) -> PolicyStore:
    """A one-node store (an agent with no `[raft]` section)."""
    from infermesh.agent.policy.local import LocalPolicyStore

    return LocalPolicyStore(context)


def raft_policy_store(context: PolicyStoreContext) -> PolicyStore:
    """A PySyncObj Raft voter; `context.options` is the `[raft]` table."""
    from infermesh.agent.policy.raft import RaftPolicyStore

    return RaftPolicyStore(context)


def remote_policy_store(context: PolicyStoreContext) -> PolicyStore:
    """A non-voter reading the policy through voter agents' Control API (`[policy] voters`)."""
    from infermesh.agent.policy.remote import RemotePolicyStore

    return RemotePolicyStore(context)


@hookimpl
def infermesh_register_policy_stores(register: RegisterPolicyStore) -> None:
    register("local", local_policy_store)
    register("raft", raft_policy_store)
    register("remote", remote_policy_store)

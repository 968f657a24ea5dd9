"""The agent's plugin: `infermesh agent`, `infermesh certs`, the `local`, `raft` and `remote`
policy stores, and the mapped runtime adapters (`tgi`, `sglang`, `torchserve`, `tfserving`,
`ovms`, `generic`).

The built-in scorers live in infermesh-core (`infermesh.core.scoring`) and are registered by
core's plugin, so a router scoring locally has them without installing the agent. Nothing here
does I/O; the command's heavy imports (gRPC, aiohttp) happen only when `agent run` starts, and
PySyncObj only when a raft store is built.
"""

from __future__ import annotations

from infermesh.agent.runtimes.generic.mapping import SHIPPED
from infermesh.core.contracts import AdapterContext, RuntimeAdapter, RuntimeAdapterFactory
from infermesh.core.hookspecs import (
    RegisterCommand,
    RegisterPolicyStore,
    RegisterRuntimeAdapter,
    hookimpl,
)
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


def mapped_runtime(kind: str) -> RuntimeAdapterFactory:
    """The factory of a mapped runtime kind; aiohttp is imported when an adapter is built."""

    def build(context: AdapterContext) -> RuntimeAdapter:
        from infermesh.agent.runtimes.generic.adapter import GenericAdapter

        return GenericAdapter(context, kind)

    return build


@hookimpl
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    """Mapped runtimes: TGI, SGLang, TorchServe, TF Serving and OVMS with their shipped
    mappings, and `generic` with the operator's mapping file (`options.mapping`)."""
    for kind in (*SHIPPED, "generic"):
        register(kind, mapped_runtime(kind))

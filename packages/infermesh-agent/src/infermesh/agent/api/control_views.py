"""What ListNodes/GetNode and ListModels/GetModel answer, built from what the agent knows.

Pure functions, no I/O: gossip members, this agent's own node, the state store's targets and
GPUs and the policy in force go in, `control_pb2` messages come out. `now` (Unix seconds) turns
each state's `last_updated` into the age an operator sees.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from infermesh.core.model import GpuState, ModelState
from infermesh.core.policy import PolicySet
from infermesh.core.proto import control_pb2

if TYPE_CHECKING:
    from infermesh.agent.gossip.node import MemberInfo
    from infermesh.agent.gossip.values import NodeMeta

__all__ = ["gpu_view", "model_views", "node_views", "routable", "target_view"]


def _age_s(now: float, last_updated: float) -> float:
    return max(0.0, now - last_updated) if last_updated > 0 else 0.0


def target_view(state: ModelState, now: float) -> control_pb2.Target:
    key = state.key
    return control_pb2.Target(
        node=key.node,
        model=key.model,
        endpoint=key.endpoint,
        healthy=state.healthy,
        health_reason=state.health_reason,
        loaded=state.loaded,
        warming=state.warming,
        running=state.running,
        waiting=state.waiting,
        kv_cache_usage=state.kv_cache_usage,
        adapters=list(state.adapters),
        age_s=_age_s(now, state.last_updated),
        runtime=state.labels.runtime,
    )


def gpu_view(gpu: GpuState, now: float) -> control_pb2.Gpu:
    healthy, reason = gpu.health
    return control_pb2.Gpu(
        node=gpu.key.node,
        uuid=gpu.key.gpu_uuid,
        index=gpu.index,
        name=gpu.name,
        mig_profile=gpu.mig_profile,
        utilization=gpu.utilization,
        memory_used_bytes=gpu.memory_used_bytes,
        memory_total_bytes=gpu.memory_total_bytes,
        temperature_c=gpu.temperature_c,
        power_w=gpu.power_w,
        healthy=healthy,
        health_reason=reason,
        age_s=_age_s(now, gpu.last_updated),
    )


def node_views(
    self_meta: NodeMeta,
    members: Iterable[MemberInfo],
    states: Sequence[ModelState],
    gpus: Sequence[GpuState],
    policy: PolicySet,
    now: float,
) -> list[control_pb2.Node]:
    """Every gossip member plus this agent's node (`is_self`; alive, with `self_meta` when gossip
    does not list it), with drains, targets and GPUs; ordered by name."""
    by_name: dict[str, control_pb2.Node] = {}
    for member in members:
        node = _node(member.node, member.meta, policy)
        node.state = member.state
        node.address = member.address
        node.incarnation = member.incarnation
        node.rtt_s = member.rtt_s or 0.0
        by_name[member.node] = node
    me = by_name.get(self_meta.node)
    if me is None:
        me = by_name[self_meta.node] = _node(self_meta.node, self_meta, policy)
        me.state = "alive"
    me.is_self = True
    me.rtt_s = 0.0
    for state in states:
        if state.key.node in by_name:
            by_name[state.key.node].targets.append(target_view(state, now))
    for gpu in gpus:
        if gpu.key.node in by_name:
            by_name[gpu.key.node].gpus.append(gpu_view(gpu, now))
    return [by_name[name] for name in sorted(by_name)]


def _node(name: str, meta: NodeMeta | None, policy: PolicySet) -> control_pb2.Node:
    node = control_pb2.Node(name=name)
    if meta is not None:
        node.zone = meta.zone
        node.roles.extend(meta.roles)
        node.labels.update(dict(meta.labels))
        node.apis.update(dict(meta.apis))
        node.runtimes.extend(meta.runtimes)
    drain = policy.drains.get(name)
    if drain is not None:
        node.drained = True
        node.drain_reason = drain.reason
        node.drained_since = drain.since
    return node


def routable(state: ModelState, model: str, policy: PolicySet) -> bool:
    """Whether a target takes new requests for `model` now: healthy, loaded, its node not
    drained and, when `model` is pinned, inside the pin."""
    node = state.key.node
    pin = policy.pins.get(model)
    return (
        state.healthy
        and state.loaded
        and node not in policy.drains
        and (pin is None or node in pin.nodes)
    )


def model_views(
    states: Sequence[ModelState], policy: PolicySet, now: float
) -> list[control_pb2.Model]:
    """Every model a target serves (base models and the LoRA adapters on top of them) and every
    pinned model, even one no target serves; ordered by name, targets by node then endpoint.

    A LoRA adapter's targets are the base targets that list it, unless the runtime reports the
    adapter as a target of its own on that endpoint (vLLM does): then that one, not both.
    """
    served: dict[str, list[ModelState]] = {name: [] for name in policy.pins}
    own = {(s.key.model, s.key.node, s.key.endpoint) for s in states}
    for state in states:
        served.setdefault(state.key.model, []).append(state)
        for name in state.adapters:
            if (name, state.key.node, state.key.endpoint) not in own:
                served.setdefault(name, []).append(state)
    models = []
    for name in sorted(served):
        targets = sorted(served[name], key=lambda s: (s.key.node, s.key.endpoint, s.key.model))
        pin = policy.pins.get(name)
        models.append(
            control_pb2.Model(
                name=name,
                targets=[target_view(s, now) for s in targets],
                healthy_targets=sum(1 for s in targets if routable(s, name, policy)),
                pinned_nodes=list(pin.nodes) if pin is not None else [],
                min_replicas=pin.min_replicas if pin is not None else 0,
            )
        )
    return models

"""The mesh side of the Control API: nodes, models, pins and the event stream.

`MeshView` is what the agent lends the Control service to answer from (its node, gossip members,
the state store, the policy store's backend name); the functions here turn requests into answers
or into `LookupError`/`ValueError` messages that the servicer maps to NOT_FOUND/INVALID_ARGUMENT.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from infermesh.agent.api.control_views import model_views, node_views
from infermesh.agent.events import EVENT_KINDS, Event, EventJournal
from infermesh.core.policy import PolicySet, PolicyStoreStatus
from infermesh.core.proto import control_pb2
from infermesh.core.scoring.state import StateStore

if TYPE_CHECKING:
    from infermesh.agent.gossip.node import MemberInfo
    from infermesh.agent.gossip.values import NodeMeta

__all__ = [
    "MeshView",
    "check_kinds",
    "event_view",
    "events_for",
    "get_model",
    "get_node",
    "list_models",
    "list_nodes",
    "pin_document",
    "unpin_document",
]

_MAX_LISTED = 10


def _no_members() -> Sequence[MemberInfo]:
    return ()


@attrs.frozen
class MeshView:
    """What the answering agent knows about the mesh, read at each call."""

    meta: Callable[[], NodeMeta]
    """This agent's own node as it advertises itself (name, roles, zone, APIs, runtimes)."""
    state: StateStore
    members: Callable[[], Sequence[MemberInfo]] = _no_members
    """Gossip members (empty without gossip)."""
    backend: str = "local"
    """The policy store backend's name: local, raft, remote or a plugin's."""
    clock: Callable[[], float] = time.time


# --------------------------------------------------------------------------- nodes


def _nodes(mesh: MeshView, policy: PolicySet) -> list[control_pb2.Node]:
    return node_views(
        mesh.meta(),
        mesh.members(),
        mesh.state.model_states(),
        mesh.state.gpu_states(),
        policy,
        mesh.clock(),
    )


def list_nodes(
    mesh: MeshView, policy: PolicySet, status: PolicyStoreStatus
) -> control_pb2.NodeList:
    return control_pb2.NodeList(
        answered_by=mesh.meta().node,
        policy_revision=policy.revision,
        nodes=_nodes(mesh, policy),
        policy_store=control_pb2.PolicyStoreInfo(
            backend=mesh.backend,
            role=status.role,
            leader=status.leader or "",
            voters=list(status.voters),
            revision=status.revision,
        ),
    )


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return (shown + (", ..." if len(names) > _MAX_LISTED else "")) or "none"


def get_node(mesh: MeshView, policy: PolicySet, name: str) -> control_pb2.Node:
    """One node; LookupError naming it and up to ten known nodes."""
    nodes = _nodes(mesh, policy)
    for node in nodes:
        if node.name == name:
            return node
    raise LookupError(
        f"node {name!r} is not known to {mesh.meta().node}; known nodes: "
        f"{_listed([n.name for n in nodes])}"
    )


# --------------------------------------------------------------------------- models


def list_models(mesh: MeshView, policy: PolicySet) -> control_pb2.ModelList:
    return control_pb2.ModelList(
        answered_by=mesh.meta().node,
        policy_revision=policy.revision,
        models=model_views(mesh.state.model_states(), policy, mesh.clock()),
    )


def get_model(mesh: MeshView, policy: PolicySet, name: str) -> control_pb2.Model:
    """One model; LookupError when no target serves it and it is not pinned."""
    models = model_views(mesh.state.model_states(), policy, mesh.clock())
    for model in models:
        if model.name == name:
            return model
    raise LookupError(
        f"model {name!r} is not served by any target and not pinned; known models: "
        f"{_listed([m.name for m in models])}"
    )


def pin_document(request: control_pb2.PinModelRequest) -> dict[str, Any]:
    """The `set pins/<model>` command (validated by the store path, which names the field)."""
    value = {"nodes": list(request.nodes), "min_replicas": request.min_replicas}
    return {"op": "set", "kind": "pins", "name": request.model, "value": value}


def unpin_document(model: str, policy: PolicySet) -> dict[str, Any]:
    """The `delete pins/<model>` command; ValueError when the model has no pin."""
    if not model:
        raise ValueError("model: required")
    if model not in policy.pins:
        pinned = _listed(sorted(policy.pins))
        raise ValueError(f"pins[{model!r}]: model {model} is not pinned; pinned models: {pinned}")
    return {"op": "delete", "kind": "pins", "name": model}


# --------------------------------------------------------------------------- events


def event_view(event: Event) -> control_pb2.Event:
    return control_pb2.Event(
        seq=event.seq,
        time=event.time,
        kind=event.kind,
        action=event.action,
        subject=event.subject,
        node=event.node,
        message=event.message,
        attributes=dict(event.attributes),
        recorded_by=event.recorded_by,
    )


def check_kinds(kinds: Sequence[str]) -> frozenset[str]:
    """The kinds asked for; ValueError naming an unknown one and the known ones."""
    for kind in kinds:
        if kind not in EVENT_KINDS:
            known = ", ".join(EVENT_KINDS)
            raise ValueError(f"kinds: unknown event kind {kind!r}; expected one of: {known}")
    return frozenset(kinds)


async def events_for(
    journal: EventJournal, after_seq: int, kinds: frozenset[str], follow: bool
) -> AsyncIterator[control_pb2.Event]:
    """The kept events after `after_seq` (a `gap` first when some were dropped) and, with
    `follow`, every new one until the journal closes (the agent stops) or the client leaves."""
    cursor = after_seq
    while True:
        batch = journal.since(cursor, kinds)
        # Read together with the batch (no await between): `since` filtered by kind, so the
        # cursor moves past everything it looked at, and nothing recorded while we send is lost.
        cursor = journal.last_seq
        for event in batch:
            yield event_view(event)
        if not follow or not await journal.wait_after(cursor):
            return

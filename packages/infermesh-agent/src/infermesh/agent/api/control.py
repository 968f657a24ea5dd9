"""gRPC servicer of `infermesh.v1.Control`: who may call what, and the thin shell over the parts.

`ALLOWED_RPCS` and `effective_role`/`is_allowed` decide access from the caller's identity and
the policy in force (pure, no I/O). `ControlService` turns protobuf into `PolicyCommand`s for a
`PolicyStore`, asks `control_mesh` about nodes, models and events and `RuntimeOps` to load and
unload models, and maps their errors to gRPC statuses. The caller's identity comes from `CALLER`
(set by `ClientIdentityInterceptor`) or, without the interceptor, straight from the verified
client certificate; a node certificate may name another caller in `infermesh-on-behalf-of`
(`api.caller`), who is then the one authorized.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc

from infermesh.agent.api import control_mesh
from infermesh.agent.api.caller import CallerError, on_behalf_of, resolve_caller
from infermesh.agent.api.control_mesh import MeshView
from infermesh.agent.api.status import abort
from infermesh.agent.certs import Identity
from infermesh.agent.events import EventJournal
from infermesh.agent.runtime_ops import Op, OperationError, RuntimeOps
from infermesh.agent.tls import CALLER, require_peer_identity
from infermesh.core.logging import get_logger
from infermesh.core.policy import (
    DrainNode,
    NotLeaderError,
    PolicyCommand,
    PolicyError,
    PolicyKind,
    PolicySet,
    PolicyStore,
    UndrainNode,
    command_from_document,
    command_to_document,
)
from infermesh.core.proto import control_pb2, control_pb2_grpc

__all__ = ["ALLOWED_RPCS", "READ_RPCS", "ControlService", "effective_role", "is_allowed"]

log = get_logger("infermesh.agent.control")

_P = TypeVar("_P")

READ_RPCS = frozenset(
    {
        "GetPolicy",
        "ListPolicies",
        "ListNodes",
        "GetNode",
        "ListModels",
        "GetModel",
        "SubscribeEvents",
    }
)
_OPERATOR_RPCS = frozenset(
    {"DrainNode", "UndrainNode", "PinModel", "UnpinModel", "LoadModel", "UnloadModel"}
)
_POLICY_WRITE_RPCS = frozenset({"SetPolicy", "DeletePolicy"})

ALLOWED_RPCS: Mapping[str, frozenset[str]] = {
    "viewer": READ_RPCS,
    # Node certificates identify agents; an agent that forwards a call passes the original
    # caller along (`infermesh-on-behalf-of`), so a node itself needs no more than reads.
    "node": READ_RPCS,
    "operator": READ_RPCS | _OPERATOR_RPCS,
    "admin": READ_RPCS | _OPERATOR_RPCS | _POLICY_WRITE_RPCS,
}
"""Role -> the Control RPCs it may call: the one place access is decided (docs/control-api.md)."""


def effective_role(identity: Identity, policy: PolicySet) -> str:
    """The caller's role: an `acls` entry for its identity overrides the certificate's role.

    The entry is looked up by the full identity URI (`spiffe://infermesh/<role>/<name>`) first,
    then by the name alone, so an ACL can address one certificate or every certificate of a name.
    """
    entry = policy.acls.get(identity.uri) or policy.acls.get(identity.name)
    return identity.role if entry is None else entry.role.value


def is_allowed(role: str, rpc: str) -> bool:
    """Whether `role` may call the Control RPC named `rpc`; unknown roles may call nothing."""
    return rpc in ALLOWED_RPCS.get(role, frozenset())


def _document_reply(policy: PolicySet) -> control_pb2.PolicyDocument:
    return control_pb2.PolicyDocument(
        revision=policy.revision, json=json.dumps(policy.to_document(), sort_keys=True)
    )


class ControlService(control_pb2_grpc.ControlServicer):
    """The Control API over one `PolicyStore`, the agent's view of the mesh, its event journal
    and its runtime operations.

    `clock` stamps drains with the time they were asked for (Unix seconds). Without `mesh`,
    `journal` or `operations` the RPCs that need them answer UNIMPLEMENTED saying so.
    """

    def __init__(
        self,
        store: PolicyStore,
        *,
        clock: Callable[[], float] = time.time,
        mesh: MeshView | None = None,
        journal: EventJournal | None = None,
        operations: RuntimeOps | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._mesh = mesh
        self._journal = journal
        self._operations = operations

    # ----------------------------------------------------------------------- reads

    async def GetPolicy(
        self, request: control_pb2.GetPolicyRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        _, policy = await self._authorize(context, "GetPolicy")
        return _document_reply(policy)

    async def ListPolicies(
        self, request: control_pb2.ListPoliciesRequest, context: Any
    ) -> control_pb2.PolicyEntryList:
        _, policy = await self._authorize(context, "ListPolicies")
        try:
            kinds = [PolicyKind.parse(request.kind)] if request.kind else list(PolicyKind)
        except PolicyError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"kind: {exc}")
        document = policy.to_document()
        entries = [
            control_pb2.PolicyEntry(
                kind=kind.value, name=name, value_json=json.dumps(value, sort_keys=True)
            )
            for kind in kinds
            for name, value in document.get(kind.value, {}).items()
        ]
        return control_pb2.PolicyEntryList(revision=policy.revision, entries=entries)

    # ----------------------------------------------------------------------- writes

    async def SetPolicy(
        self, request: control_pb2.SetPolicyRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, _ = await self._authorize(context, "SetPolicy")
        try:
            value = json.loads(request.value_json) if request.value_json else {}
        except json.JSONDecodeError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"value_json: not JSON ({exc})")
        document = {"op": "set", "kind": request.kind, "name": request.name, "value": value}
        return await self._submit(context, caller, document)

    async def DeletePolicy(
        self, request: control_pb2.DeletePolicyRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, _ = await self._authorize(context, "DeletePolicy")
        document = {"op": "delete", "kind": request.kind, "name": request.name}
        return await self._submit(context, caller, document)

    async def DrainNode(
        self, request: control_pb2.DrainNodeRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, _ = await self._authorize(context, "DrainNode")
        command = DrainNode(request.node, request.reason, self._clock())
        return await self._submit(context, caller, command_to_document(command))

    async def UndrainNode(
        self, request: control_pb2.UndrainNodeRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, _ = await self._authorize(context, "UndrainNode")
        return await self._submit(context, caller, command_to_document(UndrainNode(request.node)))

    # ----------------------------------------------------------------------- nodes and models

    async def ListNodes(
        self, request: control_pb2.ListNodesRequest, context: Any
    ) -> control_pb2.NodeList:
        _, policy = await self._authorize(context, "ListNodes")
        mesh = await self._need(context, self._mesh, "ListNodes")
        return control_mesh.list_nodes(mesh, policy, await self._store.status())

    async def GetNode(self, request: control_pb2.GetNodeRequest, context: Any) -> control_pb2.Node:
        _, policy = await self._authorize(context, "GetNode")
        mesh = await self._need(context, self._mesh, "GetNode")
        try:
            return control_mesh.get_node(mesh, policy, request.node)
        except LookupError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc.args[0]))

    async def ListModels(
        self, request: control_pb2.ListModelsRequest, context: Any
    ) -> control_pb2.ModelList:
        _, policy = await self._authorize(context, "ListModels")
        mesh = await self._need(context, self._mesh, "ListModels")
        return control_mesh.list_models(mesh, policy)

    async def GetModel(
        self, request: control_pb2.GetModelRequest, context: Any
    ) -> control_pb2.Model:
        _, policy = await self._authorize(context, "GetModel")
        mesh = await self._need(context, self._mesh, "GetModel")
        try:
            return control_mesh.get_model(mesh, policy, request.model)
        except LookupError as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc.args[0]))

    async def PinModel(
        self, request: control_pb2.PinModelRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, _ = await self._authorize(context, "PinModel")
        return await self._submit(context, caller, control_mesh.pin_document(request))

    async def UnpinModel(
        self, request: control_pb2.UnpinModelRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        caller, policy = await self._authorize(context, "UnpinModel")
        try:
            document = control_mesh.unpin_document(request.model, policy)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return await self._submit(context, caller, document)

    async def LoadModel(
        self, request: control_pb2.LoadModelRequest, context: Any
    ) -> control_pb2.ModelOperationReply:
        caller, _ = await self._authorize(context, "LoadModel")
        return await self._operate(context, "load", request, caller)

    async def UnloadModel(
        self, request: control_pb2.UnloadModelRequest, context: Any
    ) -> control_pb2.ModelOperationReply:
        caller, _ = await self._authorize(context, "UnloadModel")
        return await self._operate(context, "unload", request, caller)

    # ----------------------------------------------------------------------- events

    async def SubscribeEvents(
        self, request: control_pb2.SubscribeEventsRequest, context: Any
    ) -> AsyncIterator[control_pb2.Event]:
        await self._authorize(context, "SubscribeEvents")
        journal = await self._need(context, self._journal, "SubscribeEvents")
        try:
            kinds = control_mesh.check_kinds(request.kinds)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        # Tell the client the subscription stands even before the first event arrives.
        await context.send_initial_metadata(())
        async for event in control_mesh.events_for(
            journal, request.after_seq, kinds, request.follow
        ):
            yield event

    # ----------------------------------------------------------------------- helpers

    async def _authorize(self, context: Any, rpc: str) -> tuple[Identity, PolicySet]:
        """The caller and the policy in force, once the caller may call `rpc`; else end the call.

        UNAUTHENTICATED without a client identity, PERMISSION_DENIED naming the role and RPC.
        """
        peer = CALLER.get(None) or await require_peer_identity(context)
        try:
            identity = resolve_caller(peer, on_behalf_of(context.invocation_metadata()))
        except CallerError as exc:
            code = (
                grpc.StatusCode.PERMISSION_DENIED
                if exc.permission
                else (grpc.StatusCode.INVALID_ARGUMENT)
            )
            await abort(context, code, str(exc))
        # Whatever this call forwards (a write to a voter, a load to another node) goes on
        # behalf of the original caller, not of the node that forwarded it here.
        CALLER.set(identity)
        policy = await self._store.get()
        role = effective_role(identity, policy)
        if not is_allowed(role, rpc):
            via = f" (forwarded by {peer.name})" if identity is not peer else ""
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name} has role {role}, which may not call {rpc}{via}",
            )
        return identity, policy

    async def _need(self, context: Any, part: _P | None, rpc: str) -> _P:
        if part is None:
            await abort(
                context,
                grpc.StatusCode.UNIMPLEMENTED,
                f"{rpc} is not served here: this Control service was built without the agent's "
                "view of the mesh",
            )
        return part

    async def _operate(
        self,
        context: Any,
        op: Op,
        request: control_pb2.LoadModelRequest | control_pb2.UnloadModelRequest,
        caller: Identity,
    ) -> control_pb2.ModelOperationReply:
        operations = await self._need(context, self._operations, f"{op.title()}Model")
        try:
            return await operations.run(op, request, caller)
        except OperationError as exc:
            await abort(context, exc.code, str(exc))

    async def _submit(
        self, context: Any, caller: Identity, document: dict[str, Any]
    ) -> control_pb2.PolicyDocument:
        """Validate and commit a command document; store errors become gRPC statuses."""
        try:
            command: PolicyCommand = command_from_document(document)
            policy = await self._store.submit(command)
        except PermissionError as exc:  # a voter refused a write this agent forwarded
            await abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except PolicyError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotLeaderError as exc:
            await self._abort_not_leader(context, exc)
        log.info("policy changed", op=document["op"], by=str(caller), revision=policy.revision)
        return _document_reply(policy)

    async def _abort_not_leader(self, context: Any, exc: NotLeaderError) -> NoReturn:
        status = await self._store.status()
        leader = f"the leader is {status.leader}" if status.leader else "no leader is known"
        await abort(
            context,
            grpc.StatusCode.UNAVAILABLE,
            f"the change was not committed ({exc}); {leader}; retry later",
        )

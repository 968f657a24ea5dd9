"""gRPC servicer of `infermesh.v1.Control` (policy part): who may call what, and the policy store.

Two jobs, kept apart: `ALLOWED_RPCS` and `effective_role`/`is_allowed` decide access from the
caller's identity and the policy in force (pure, no I/O); `ControlService` is the thin shell that
turns protobuf into `PolicyCommand`s for a `PolicyStore` and store errors into gRPC statuses.
The caller's identity comes from `CALLER` (set by `ClientIdentityInterceptor`) or, without the
interceptor, straight from the verified client certificate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import grpc

from infermesh.agent.api.status import abort
from infermesh.agent.certs import Identity
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

READ_RPCS = frozenset({"GetPolicy", "ListPolicies"})
_DRAIN_RPCS = frozenset({"DrainNode", "UndrainNode"})
_POLICY_WRITE_RPCS = frozenset({"SetPolicy", "DeletePolicy"})

ALLOWED_RPCS: Mapping[str, frozenset[str]] = {
    "viewer": READ_RPCS,
    # Node certificates identify agents; forwarding writes to the leader will pass the original
    # caller along, so a node itself needs no more than reads.
    "node": READ_RPCS,
    "operator": READ_RPCS | _DRAIN_RPCS,
    "admin": READ_RPCS | _DRAIN_RPCS | _POLICY_WRITE_RPCS,
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
    """The policy RPCs of the Control API over one `PolicyStore`.

    `clock` stamps drains with the time they were asked for (Unix seconds).
    """

    def __init__(self, store: PolicyStore, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

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

    # ----------------------------------------------------------------------- helpers

    async def _authorize(self, context: Any, rpc: str) -> tuple[Identity, PolicySet]:
        """The caller and the policy in force, once the caller may call `rpc`; else end the call.

        UNAUTHENTICATED without a client identity, PERMISSION_DENIED naming the role and RPC.
        """
        identity = CALLER.get(None) or await require_peer_identity(context)
        policy = await self._store.get()
        role = effective_role(identity, policy)
        if not is_allowed(role, rpc):
            await abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.name} has role {role}, which may not call {rpc}",
            )
        return identity, policy

    async def _submit(
        self, context: Any, caller: Identity, document: dict[str, Any]
    ) -> control_pb2.PolicyDocument:
        """Validate and commit a command document; store errors become gRPC statuses."""
        try:
            command: PolicyCommand = command_from_document(document)
            policy = await self._store.submit(command)
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

"""Forwards LoadModel/UnloadModel to the agent of the node that runs the model.

The node's Control address comes from gossip (`NodeMeta.apis["control"]`); the call goes over
mutual TLS with this agent's own `[control]` certificate, which must be a node certificate, and
names the original caller in `infermesh-on-behalf-of`, so the other agent authorizes the caller,
not this agent. The other agent's status and message come back unchanged, prefixed with the node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from infermesh.agent.api.caller import forwarding_metadata
from infermesh.agent.certs import Identity
from infermesh.agent.runtime_ops import Op, OperationError
from infermesh.core.proto import control_pb2, control_pb2_grpc

if TYPE_CHECKING:
    from infermesh.agent.gossip.node import MemberInfo

__all__ = ["ControlForwarder", "control_address"]

DEFAULT_FORWARD_TIMEOUT_S = 130.0
"""Deadline of a forwarded call: the other agent's operation timeout plus some slack."""

_MAX_LISTED = 10


def control_address(node: str, members: Sequence[MemberInfo]) -> str:
    """Where `node`'s agent serves the Control API; OperationError saying why there is none."""
    member = next((m for m in members if m.node == node), None)
    if member is None:
        known = sorted(m.node for m in members)
        listed = ", ".join(known[:_MAX_LISTED]) + (", ..." if len(known) > _MAX_LISTED else "")
        raise OperationError(
            grpc.StatusCode.NOT_FOUND,
            f"node {node} is not known to this agent; known nodes: {listed or 'none'}",
        )
    if member.state in ("dead", "left"):
        raise OperationError(
            grpc.StatusCode.UNAVAILABLE, f"node {node} is {member.state} (gossip membership)"
        )
    address = dict(member.meta.apis).get("control") if member.meta is not None else None
    if not address:
        raise OperationError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node {node} does not advertise a Control API (its agent has no control.listen "
            "with a fixed port, or runs without one); load the model through that node's agent",
        )
    return address


class ControlForwarder:
    """Sends one LoadModel/UnloadModel to another agent on behalf of the caller."""

    def __init__(
        self,
        credentials: grpc.ChannelCredentials,
        members: Callable[[], Sequence[MemberInfo]],
        *,
        timeout_s: float = DEFAULT_FORWARD_TIMEOUT_S,
    ) -> None:
        self._credentials = credentials
        self._members = members
        self.timeout_s = timeout_s

    async def __call__(
        self,
        op: Op,
        node: str,
        request: control_pb2.LoadModelRequest | control_pb2.UnloadModelRequest,
        caller: Identity,
    ) -> control_pb2.ModelOperationReply:
        address = control_address(node, self._members())
        metadata = forwarding_metadata(caller)
        try:
            async with grpc.aio.secure_channel(address, self._credentials) as channel:
                stub = control_pb2_grpc.ControlStub(channel)
                if isinstance(request, control_pb2.LoadModelRequest):
                    reply: control_pb2.ModelOperationReply = await stub.LoadModel(
                        request, metadata=metadata, timeout=self.timeout_s
                    )
                else:
                    reply = await stub.UnloadModel(
                        request, metadata=metadata, timeout=self.timeout_s
                    )
        except grpc.aio.AioRpcError as exc:
            raise OperationError(
                exc.code(), f"node {node} ({address}) answered: {exc.details()}"
            ) from None
        return reply

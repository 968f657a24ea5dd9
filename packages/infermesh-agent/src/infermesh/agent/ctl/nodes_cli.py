"""`infermesh nodes list|describe|drain|undrain`: the nodes an agent knows and their drains.

Only turns flags into Control API requests and replies into output (see `render`).
Protobuf and rich are imported inside the command bodies, so `infermesh --help` stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from infermesh.agent.ctl.options import Invocation, Output, common_options, run

if TYPE_CHECKING:
    from infermesh.agent.ctl.client import ControlClient

__all__ = ["nodes_group"]


@click.group("nodes")
def nodes_group() -> None:
    """Nodes of the mesh as an agent sees them; drain a node for maintenance."""


@nodes_group.command("list")
@common_options
def list_command(invocation: Invocation) -> None:
    """Every node the agent knows: state, zone, drain, targets, GPUs and round-trip time.

    Under the table: the answering agent's policy store (role and leader).
    """

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.ListNodes, control_pb2.ListNodesRequest())
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(render.nodes_view(reply))

    run(invocation, body)


@nodes_group.command("describe")
@click.argument("node")
@common_options
def describe_command(node: str, invocation: Invocation) -> None:
    """One node: its gossip state, APIs, runtimes, drain, targets and GPUs (exit 3: unknown)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.GetNode, control_pb2.GetNodeRequest(node=node))
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(render.node_view(reply))

    run(invocation, body)


@nodes_group.command("drain")
@click.argument("node")
@click.option("--reason", default="", help="Why, shown by `nodes list` (e.g. 'kernel upgrade').")
@common_options
def drain_command(node: str, reason: str, invocation: Invocation) -> None:
    """Send no new requests to NODE; requests already running there finish (operator role)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.DrainNodeRequest(node=node, reason=reason)
        reply = client.call(client.stub.DrainNode, request)
        if out.json_output:
            out.document(render.policy_dict(reply))
        else:
            why = f" ({reason})" if reason else ""
            out.show(
                f"drained {node}{why}: it gets no new requests, running ones finish "
                f"(policy revision {reply.revision})"
            )

    run(invocation, body)


@nodes_group.command("undrain")
@click.argument("node")
@common_options
def undrain_command(node: str, invocation: Invocation) -> None:
    """Let NODE take new requests again (exit 2 when it is not drained)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.UndrainNodeRequest(node=node)
        reply = client.call(client.stub.UndrainNode, request)
        if out.json_output:
            out.document(render.policy_dict(reply))
        else:
            out.show(f"undrained {node}: it takes new requests (policy revision {reply.revision})")

    run(invocation, body)

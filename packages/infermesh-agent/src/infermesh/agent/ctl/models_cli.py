"""`infermesh models list|describe|pin|unpin|load|unload`: where models are served, pins, and
loading (for vLLM: LoRA adapters) through a node's runtime.

Only turns flags into Control API requests and replies into output (see `render`).
Protobuf and rich are imported inside the command bodies, so `infermesh --help` stays quick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from infermesh.agent.ctl.options import Invocation, Output, common_options, run

if TYPE_CHECKING:
    from infermesh.agent.ctl.client import ControlClient

__all__ = ["models_group"]

_runtime_option = click.option(
    "--runtime",
    metavar="URL",
    default="",
    help="The runtime's base URL, when the node has more than one that can load models.",
)


@click.group("models")
def models_group() -> None:
    """Models served in the mesh: targets, health, pins; load and unload on a node."""


@models_group.command("list")
@common_options
def list_command(invocation: Invocation) -> None:
    """Every model served somewhere or pinned: targets, routable targets and pinned nodes."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.ListModels, control_pb2.ListModelsRequest())
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(render.models_table(reply))

    run(invocation, body)


@models_group.command("describe")
@click.argument("model")
@common_options
def describe_command(model: str, invocation: Invocation) -> None:
    """One model: its pin and every target serving it (exit 3: unknown model)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.GetModel, control_pb2.GetModelRequest(model=model))
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(render.model_view(reply))

    run(invocation, body)


@models_group.command("pin")
@click.argument("model")
@click.argument("nodes", nargs=-1, required=True)
@click.option(
    "--min-replicas",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="How many of the nodes should have the model loaded.",
)
@common_options
def pin_command(
    model: str, nodes: Sequence[str], min_replicas: int, invocation: Invocation
) -> None:
    """Serve MODEL only from NODES (operator role); replaces an earlier pin."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.PinModelRequest(
            model=model, nodes=list(nodes), min_replicas=min_replicas
        )
        reply = client.call(client.stub.PinModel, request)
        if out.json_output:
            out.document(render.policy_dict(reply))
        else:
            minimum = f", at least {min_replicas} loaded" if min_replicas else ""
            out.show(
                f"pinned {model} to {', '.join(nodes)}{minimum} (policy revision {reply.revision})"
            )

    run(invocation, body)


@models_group.command("unpin")
@click.argument("model")
@common_options
def unpin_command(model: str, invocation: Invocation) -> None:
    """Let MODEL be served from any node again (exit 2 when it is not pinned)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.UnpinModel, control_pb2.UnpinModelRequest(model=model))
        if out.json_output:
            out.document(render.policy_dict(reply))
        else:
            out.show(f"unpinned {model} (policy revision {reply.revision})")

    run(invocation, body)


@models_group.command("load")
@click.argument("model")
@click.option("--node", required=True, help="The node whose runtime loads it.")
@click.option(
    "--source", required=True, metavar="PATH", help="Where the runtime finds it (adapter path)."
)
@_runtime_option
@common_options
def load_command(model: str, node: str, source: str, runtime: str, invocation: Invocation) -> None:
    """Load MODEL on NODE's runtime (for vLLM: a LoRA adapter named MODEL) (operator role).

    \b
    infermesh models load sql-lora --node gpu-1 --source /adapters/sql-lora
    """

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.LoadModelRequest(
            node=node, model=model, source=source, runtime=runtime
        )
        reply = client.call(client.stub.LoadModel, request)
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(reply.message or f"loaded {model} on {reply.node} ({reply.runtime})")

    run(invocation, body)


@models_group.command("unload")
@click.argument("model")
@click.option("--node", required=True, help="The node whose runtime unloads it.")
@_runtime_option
@common_options
def unload_command(model: str, node: str, runtime: str, invocation: Invocation) -> None:
    """Unload MODEL from NODE's runtime (operator role)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.UnloadModelRequest(node=node, model=model, runtime=runtime)
        reply = client.call(client.stub.UnloadModel, request)
        if out.json_output:
            out.document(render.message_dict(reply))
        else:
            out.show(reply.message or f"unloaded {model} from {reply.node} ({reply.runtime})")

    run(invocation, body)

"""`infermesh policy get|list|set|delete`: read and change the cluster policy (docs/policy.md).

Only turns flags and files into Control API requests and replies into output; reading the input
of `set` is `policy_input`'s job, done before any connection is made.
Protobuf and rich are imported inside the command bodies, so `infermesh --help` stays quick.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from infermesh.agent.ctl.errors import CtlError
from infermesh.agent.ctl.options import Invocation, Output, common_options, fail, run

if TYPE_CHECKING:
    from infermesh.agent.ctl.client import ControlClient

__all__ = ["policy_group"]


@click.group("policy")
def policy_group() -> None:
    """The cluster policy: scoring, admission, hedging, pins, drains, quotas and ACLs."""


@policy_group.command("get")
@common_options
def get_command(invocation: Invocation) -> None:
    """The whole policy in force on the agent, as a policy document (with its revision)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        reply = client.call(client.stub.GetPolicy, control_pb2.GetPolicyRequest())
        document = render.policy_dict(reply)["policy"]
        if out.json_output:
            out.document(document)
        else:
            from rich.json import JSON

            out.show(JSON(json.dumps(document, sort_keys=True)))

    run(invocation, body)


@policy_group.command("list")
@click.argument("kind", required=False, default="")
@common_options
def list_command(kind: str, invocation: Invocation) -> None:
    """The policy entries of KIND (scoring, admission, hedging, pins, drains, quotas, acls),
    or of every kind."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.ListPoliciesRequest(kind=kind)
        reply = client.call(client.stub.ListPolicies, request)
        if out.json_output:
            out.document(render.entries_dict(reply))
        else:
            out.show(render.entries_table(reply))

    run(invocation, body)


@policy_group.command("set")
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option(
    "--file",
    "file",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PATH",
    help="TOML (.toml) or JSON file: the entry's fields, or a document of several entries.",
)
@click.option("--value", metavar="JSON", help="The entry's fields as a JSON object.")
@common_options
def set_command(
    kind: str | None,
    name: str | None,
    file: Path | None,
    value: str | None,
    invocation: Invocation,
) -> None:
    """Create or replace policy entries (admin role).

    With KIND and NAME the input holds that entry's fields; without them it is a policy
    document whose tables (`[pins.llama]`, ...) are set one by one, stopping at the first the
    agent refuses.

    \b
    infermesh policy set pins llama --value '{"nodes": ["gpu-1", "gpu-2"]}'
    infermesh policy set --file policy.toml
    """
    from infermesh.agent.ctl.policy_input import parse_entries, read_input

    try:
        parsed, source = read_input(file, value)
        entries = parse_entries(parsed, source, kind, name)
    except CtlError as error:
        fail(error)

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.core.proto import control_pb2

        applied: list[dict[str, object]] = []
        for done, entry in enumerate(entries):
            request = control_pb2.SetPolicyRequest(
                kind=entry.kind, name=entry.name, value_json=json.dumps(entry.value)
            )
            try:
                reply = client.call(client.stub.SetPolicy, request)
            except CtlError as error:
                if len(entries) > 1:
                    error.message = (
                        f"{entry.label} from {source}: {error.message} "
                        f"({done} of {len(entries)} entries were set before it)"
                    )
                raise
            applied.append({"kind": entry.kind, "name": entry.name, "revision": reply.revision})
            if not out.json_output:
                out.show(f"set {entry.label} (policy revision {reply.revision})")
        if out.json_output:
            out.document({"set": applied})

    run(invocation, body)


@policy_group.command("delete")
@click.argument("kind")
@click.argument("name")
@common_options
def delete_command(kind: str, name: str, invocation: Invocation) -> None:
    """Remove the policy entry NAME of KIND (admin role; exit 2 when there is none)."""

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.DeletePolicyRequest(kind=kind, name=name)
        reply = client.call(client.stub.DeletePolicy, request)
        if out.json_output:
            out.document(render.policy_dict(reply))
        else:
            out.show(f"deleted {kind}/{name} (policy revision {reply.revision})")

    run(invocation, body)

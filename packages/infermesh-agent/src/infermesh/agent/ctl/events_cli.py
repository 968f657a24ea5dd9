"""`infermesh events`: the node, model, policy and drain events an agent recorded, and with
`--follow` the new ones as they happen.

Only turns flags into a SubscribeEvents request and events into output (see `render`).
Protobuf and rich are imported inside the command bodies, so `infermesh --help` stays quick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from infermesh.agent.ctl.options import Invocation, Output, common_options, run

if TYPE_CHECKING:
    from infermesh.agent.ctl.client import ControlClient

__all__ = ["EVENT_KINDS", "events_command"]

EVENT_KINDS = ("node", "model", "policy", "drain")


@click.command("events")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events until Ctrl-C.")
@click.option(
    "--after",
    "after_seq",
    type=click.IntRange(min=0),
    default=0,
    metavar="SEQ",
    help="Only events after this sequence number (resume where you stopped).",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(EVENT_KINDS),
    help="Only events of this kind (repeatable).",
)
@common_options
def events_command(
    follow: bool, after_seq: int, kinds: Sequence[str], invocation: Invocation
) -> None:
    """Events recorded by the agent, oldest first (`--json`: one JSON object a line).

    \b
    infermesh events --kind drain --kind model
    infermesh events --follow --after 120
    """

    def body(client: ControlClient, out: Output) -> None:
        from infermesh.agent.ctl import render
        from infermesh.core.proto import control_pb2

        request = control_pb2.SubscribeEventsRequest(
            after_seq=after_seq, follow=follow, kinds=list(kinds)
        )
        stream = client.events(request)
        if out.json_output:
            for event in stream:
                out.json_line(render.message_dict(event))
        elif follow:
            out.line(render.event_line(None))
            for event in stream:
                out.line(render.event_line(event))
        else:
            events = list(stream)
            out.show(render.events_table(events) if events else "no events")

    run(invocation, body)

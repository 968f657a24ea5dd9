"""What the operator sees: nodes, models, policy entries and events as tables with the columns
that matter, and as JSON with every field (64-bit numbers as numbers, policies decoded)."""

from __future__ import annotations

import io
import json

from rich.console import Console, RenderableType

from infermesh.agent.ctl import render
from infermesh.core.proto import control_pb2

AT = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def text(renderable: RenderableType) -> str:
    out = io.StringIO()
    Console(file=out, width=200, highlight=False).print(renderable)
    return out.getvalue()


def target(node: str, model: str, *, healthy: bool = True) -> control_pb2.Target:
    return control_pb2.Target(
        node=node,
        model=model,
        endpoint=f"http://{node}:8000",
        healthy=healthy,
        health_reason="" if healthy else "probe failed",
        loaded=True,
        running=3,
        waiting=1,
        kv_cache_usage=0.25,
        adapters=["sql-lora"],
        runtime="vllm",
    )


def node_list() -> control_pb2.NodeList:
    return control_pb2.NodeList(
        answered_by="gpu-1",
        policy_revision=7,
        nodes=[
            control_pb2.Node(
                name="gpu-1",
                state="alive",
                zone="rack-a",
                is_self=True,
                targets=[target("gpu-1", "llama"), target("gpu-1", "qwen", healthy=False)],
                gpus=[control_pb2.Gpu(node="gpu-1", uuid="GPU-1", index=0, name="H100")],
            ),
            control_pb2.Node(
                name="gpu-2",
                state="suspect",
                drained=True,
                drain_reason="kernel upgrade",
                drained_since=AT,
                rtt_s=0.0012,
                incarnation=2**40,
            ),
        ],
        policy_store=control_pb2.PolicyStoreInfo(
            backend="raft", role="follower", leader="10.0.0.3:7000", voters=["a", "b", "c"]
        ),
    )


def rows(table_text: str) -> list[list[str]]:
    return [line.split() for line in table_text.splitlines() if line.strip()]


def test_nodes_list_shows_state_zone_drain_targets_gpus_rtt_and_the_policy_store() -> None:
    shown = text(render.nodes_view(node_list()))
    lines = shown.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "ZONE", "DRAINED", "TARGETS", "GPUS", "RTT"]
    assert "gpu-1 (self)" in lines[1]
    assert "rack-a" in lines[1]
    assert "1/2 healthy (llama, qwen)" in lines[1]
    assert "yes (kernel upgrade)" in lines[2]
    assert "1.2 ms" in lines[2]
    assert (
        "policy store: raft; role follower; leader 10.0.0.3:7000; voters a, b, c; revision 7 "
        "(answered by gpu-1)"
    ) in shown


def test_node_json_keeps_every_field_with_large_numbers_as_numbers() -> None:
    listed = render.message_dict(node_list())
    json.dumps(listed)  # JSON-able
    second = listed["nodes"][1]
    assert second["incarnation"] == 2**40
    assert second["drained"] is True
    assert second["labels"] == {}
    assert listed["nodes"][0]["targets"][0]["adapters"] == ["sql-lora"]
    assert listed["policy_store"]["leader"] == "10.0.0.3:7000"


def test_node_describe_shows_the_drain_time_targets_and_gpus() -> None:
    node = node_list().nodes[0]
    node.drained, node.drained_since = True, AT
    node.apis["control"] = "10.0.0.1:7960"
    shown = text(render.node_view(node))
    assert "gpu-1 (the answering agent)" in shown
    assert "yes since 2026-01-01 00:00:00Z" in shown
    assert "control=10.0.0.1:7960" in shown
    assert "no (probe failed)" in shown
    assert "GPUs" in shown
    assert "H100" in shown


def test_models_list_shows_targets_healthy_and_pinned_nodes() -> None:
    reply = control_pb2.ModelList(
        answered_by="gpu-1",
        policy_revision=3,
        models=[
            control_pb2.Model(
                name="llama",
                targets=[target("gpu-1", "llama"), target("gpu-2", "llama")],
                healthy_targets=1,
                pinned_nodes=["gpu-1"],
                min_replicas=1,
            ),
            control_pb2.Model(name="qwen", targets=[target("gpu-2", "qwen")], healthy_targets=1),
        ],
    )
    table = rows(text(render.models_table(reply)))
    assert table[0] == ["MODEL", "TARGETS", "HEALTHY", "PINNED", "NODES"]
    assert table[1] == ["llama", "2", "1", "gpu-1", "(min", "1)"]
    assert table[2] == ["qwen", "1", "1", "-"]


def test_policy_entries_show_kind_name_and_value() -> None:
    reply = control_pb2.PolicyEntryList(
        revision=4,
        entries=[
            control_pb2.PolicyEntry(kind="pins", name="llama", value_json='{"nodes": ["gpu-1"]}')
        ],
    )
    shown = text(render.entries_table(reply))
    assert rows(shown)[1] == ["pins", "llama", '{"nodes":', '["gpu-1"]}']
    assert "revision 4" in shown
    assert render.entries_dict(reply) == {
        "revision": 4,
        "entries": [{"kind": "pins", "name": "llama", "value": {"nodes": ["gpu-1"]}}],
    }
    empty = text(render.entries_table(control_pb2.PolicyEntryList(revision=4)))
    assert empty.strip() == "no policy entries (revision 4)"


def test_a_policy_document_reply_decodes_the_policy() -> None:
    reply = control_pb2.PolicyDocument(revision=2, json='{"version": 1, "revision": 2}')
    assert render.policy_dict(reply) == {"revision": 2, "policy": {"version": 1, "revision": 2}}


def test_events_show_seq_time_kind_action_subject_node_and_message() -> None:
    event = control_pb2.Event(
        seq=12,
        time=AT,
        kind="drain",
        action="drained",
        subject="gpu-2",
        node="gpu-2",
        message="gpu-2 drained: kernel upgrade",
        attributes={"by": "spiffe://infermesh/operator/ci-bot"},
    )
    table = text(render.events_table([event]))
    assert table.splitlines()[0].split() == list(render.EVENT_COLUMNS)
    assert rows(table)[1] == [
        "12",
        "2026-01-01",
        "00:00:00Z",
        "drain",
        "drained",
        "gpu-2",
        "gpu-2",
        "gpu-2",
        "drained:",
        "kernel",
        "upgrade",
    ]
    line = render.event_line(event)
    assert line.split()[:7] == [
        "12",
        "2026-01-01",
        "00:00:00Z",
        "drain",
        "drained",
        "gpu-2",
        "gpu-2",
    ]
    assert render.event_line(None).split() == list(render.EVENT_COLUMNS)
    assert render.message_dict(event)["attributes"] == {"by": "spiffe://infermesh/operator/ci-bot"}


def test_names_and_reasons_are_printed_as_given_not_as_markup() -> None:
    reply = node_list()
    reply.nodes[1].drain_reason = "[bold]ticket[/bold] :fire:"
    assert "yes ([bold]ticket[/bold] :fire:)" in text(render.nodes_view(reply))

"""What the CLI prints: Control API replies as rich tables for people and as JSON-able dicts for
`--json`. Pure: protobuf messages in, renderables and dicts out; never prints or connects.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.message import Message
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from infermesh.core.proto import control_pb2

__all__ = [
    "EVENT_COLUMNS",
    "entries_dict",
    "entries_table",
    "event_line",
    "events_table",
    "message_dict",
    "model_view",
    "models_table",
    "node_view",
    "nodes_view",
    "policy_dict",
]

NONE = "-"


def message_dict(message: Message) -> dict[str, Any]:
    """Every field of `message` by its proto name, defaults included, 64-bit ints as numbers."""
    result: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            result[field.name] = dict(value)
        elif field.is_repeated:
            result[field.name] = [
                message_dict(item) if isinstance(item, Message) else item for item in value
            ]
        elif isinstance(value, Message):
            result[field.name] = message_dict(value)
        else:
            result[field.name] = value
    return result


def policy_dict(reply: control_pb2.PolicyDocument) -> dict[str, Any]:
    """A PolicyDocument reply as `{"revision": N, "policy": <the PolicySet document>}`."""
    return {"revision": reply.revision, "policy": json.loads(reply.json) if reply.json else {}}


def entries_dict(reply: control_pb2.PolicyEntryList) -> dict[str, Any]:
    return {
        "revision": reply.revision,
        "entries": [
            {"kind": entry.kind, "name": entry.name, "value": json.loads(entry.value_json or "{}")}
            for entry in reply.entries
        ],
    }


# --------------------------------------------------------------------------- formatting


def format_time(unix_s: float) -> str:
    """Unix seconds as `2026-01-31 12:00:00Z` (UTC, so every operator reads the same)."""
    if unix_s <= 0:
        return NONE
    moment = datetime.datetime.fromtimestamp(unix_s, datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def format_rtt(rtt_s: float) -> str:
    return NONE if rtt_s <= 0 else f"{rtt_s * 1000:.1f} ms"


def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.0f}%"


def _names(values: Iterable[str]) -> str:
    return ", ".join(values) or NONE


def _pairs(values: Mapping[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(values.items())) or NONE


def _drained(node: control_pb2.Node) -> str:
    if not node.drained:
        return "no"
    return f"yes ({node.drain_reason})" if node.drain_reason else "yes"


def _health(healthy: bool, reason: str) -> str:
    if healthy:
        return "yes"
    return f"no ({reason})" if reason else "no"


def _add_row(table: Table, *cells: str) -> None:
    """Cells as plain text: a node name or drain reason like `[x]` is not rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _table(*columns: str, title: str | None = None) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


# --------------------------------------------------------------------------- nodes


def _target_summary(targets: Iterable[control_pb2.Target]) -> str:
    listed = list(targets)
    if not listed:
        return NONE
    healthy = sum(1 for target in listed if target.healthy)
    models = sorted({target.model for target in listed})
    return f"{healthy}/{len(listed)} healthy ({', '.join(models)})"


def store_line(reply: control_pb2.NodeList) -> str:
    """The line under `nodes list`: the answering agent's view of the policy store."""
    store = reply.policy_store
    parts = [f"policy store: {store.backend or 'unknown'}"]
    if store.role:
        parts.append(f"role {store.role}")
    parts.append(f"leader {store.leader}" if store.leader else "no leader known")
    if store.voters:
        parts.append(f"voters {', '.join(store.voters)}")
    parts.append(f"revision {reply.policy_revision}")
    return "; ".join(parts) + f" (answered by {reply.answered_by or 'unknown'})"


def nodes_view(reply: control_pb2.NodeList) -> RenderableType:
    table = _table("NODE", "STATE", "ZONE", "DRAINED", "TARGETS", "GPUS", "RTT")
    for node in reply.nodes:
        name = f"{node.name} (self)" if node.is_self else node.name
        _add_row(
            table,
            name,
            node.state or NONE,
            node.zone or NONE,
            _drained(node),
            _target_summary(node.targets),
            str(len(node.gpus)),
            format_rtt(node.rtt_s),
        )
    return Group(table, Text(""), Text(store_line(reply)))


def _targets_table(targets: Iterable[control_pb2.Target], *, with_node: bool) -> Table:
    columns = ["NODE"] if with_node else []
    columns += ["ENDPOINT", "MODEL", "RUNTIME", "HEALTHY", "LOADED", "RUNNING", "WAITING", "KV"]
    table = _table(*columns, "ADAPTERS", "AGE", title="Targets")
    for target in targets:
        row = [target.node] if with_node else []
        row += [
            target.endpoint,
            target.model,
            target.runtime or NONE,
            _health(target.healthy, target.health_reason),
            "warming" if target.warming else ("yes" if target.loaded else "no"),
            f"{target.running:g}",
            f"{target.waiting:g}",
            _percent(target.kv_cache_usage),
        ]
        _add_row(table, *row, _names(target.adapters), f"{target.age_s:.1f} s")
    return table


def _gpus_table(gpus: Iterable[control_pb2.Gpu]) -> Table:
    table = _table(
        "INDEX", "NAME", "UUID", "MIG", "UTIL", "MEMORY", "TEMP", "POWER", "HEALTHY", title="GPUs"
    )
    for gpu in gpus:
        _add_row(
            table,
            str(gpu.index),
            gpu.name,
            gpu.uuid,
            gpu.mig_profile or NONE,
            _percent(gpu.utilization),
            f"{format_bytes(gpu.memory_used_bytes)} / {format_bytes(gpu.memory_total_bytes)}",
            f"{gpu.temperature_c:.0f} C",
            f"{gpu.power_w:.0f} W",
            _health(gpu.healthy, gpu.health_reason),
        )
    return table


def _fields(rows: Iterable[tuple[str, str]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for label, value in rows:
        _add_row(grid, label, value)
    return grid


def node_view(node: control_pb2.Node) -> RenderableType:
    drained = _drained(node)
    if node.drained and node.drained_since > 0:
        drained += f" since {format_time(node.drained_since)}"
    fields = _fields(
        [
            ("node", f"{node.name} (the answering agent)" if node.is_self else node.name),
            ("state", node.state or NONE),
            ("address", node.address or NONE),
            ("zone", node.zone or NONE),
            ("roles", _names(node.roles)),
            ("labels", _pairs(node.labels)),
            ("apis", _pairs(node.apis)),
            ("runtimes", _names(node.runtimes)),
            ("drained", drained),
            ("rtt", format_rtt(node.rtt_s)),
            ("incarnation", str(node.incarnation)),
        ]
    )
    parts: list[RenderableType] = [fields]
    if node.targets:
        parts += [Text(""), _targets_table(node.targets, with_node=False)]
    if node.gpus:
        parts += [Text(""), _gpus_table(node.gpus)]
    return Group(*parts)


# --------------------------------------------------------------------------- models


def _pin(model: control_pb2.Model) -> str:
    if not model.pinned_nodes:
        return NONE
    pinned = ", ".join(model.pinned_nodes)
    return f"{pinned} (min {model.min_replicas})" if model.min_replicas else pinned


def models_table(reply: control_pb2.ModelList) -> RenderableType:
    table = _table("MODEL", "TARGETS", "HEALTHY", "PINNED NODES")
    for model in reply.models:
        _add_row(
            table, model.name, str(len(model.targets)), str(model.healthy_targets), _pin(model)
        )
    footer = f"policy revision {reply.policy_revision} (answered by {reply.answered_by})"
    return Group(table, Text(""), Text(footer))


def model_view(model: control_pb2.Model) -> RenderableType:
    fields = _fields(
        [
            ("model", model.name),
            ("targets", str(len(model.targets))),
            ("healthy", f"{model.healthy_targets} routable now"),
            ("pinned nodes", _pin(model)),
        ]
    )
    if not model.targets:
        return fields
    return Group(fields, Text(""), _targets_table(model.targets, with_node=True))


# --------------------------------------------------------------------------- policy


def entries_table(reply: control_pb2.PolicyEntryList) -> RenderableType:
    table = _table("KIND", "NAME", "VALUE")
    for entry in reply.entries:
        value = json.dumps(json.loads(entry.value_json or "{}"), sort_keys=True)
        _add_row(table, entry.kind, entry.name, value)
    if not reply.entries:
        return Text(f"no policy entries (revision {reply.revision})")
    return Group(table, Text(""), Text(f"revision {reply.revision}"))


# --------------------------------------------------------------------------- events

EVENT_COLUMNS = ("SEQ", "TIME", "KIND", "ACTION", "SUBJECT", "NODE", "MESSAGE")


def _event_cells(event: control_pb2.Event) -> list[str]:
    return [
        str(event.seq),
        format_time(event.time),
        event.kind,
        event.action,
        event.subject or NONE,
        event.node or NONE,
        event.message,
    ]


def events_table(events: Iterable[control_pb2.Event]) -> Table:
    table = _table(*EVENT_COLUMNS)
    for event in events:
        _add_row(table, *_event_cells(event))
    return table


# Widths of the fixed columns of a followed stream, whose rows cannot wait for a whole table.
_LINE_WIDTHS = (6, 20, 7, 11, 24, 12)


def event_line(event: control_pb2.Event | None) -> str:
    """One row of `events --follow` (None: the header), columns padded to fixed widths."""
    cells = list(EVENT_COLUMNS) if event is None else _event_cells(event)
    padded = [cell.ljust(width) for cell, width in zip(cells, _LINE_WIDTHS, strict=False)]
    return " ".join([*padded, cells[-1]]).rstrip()

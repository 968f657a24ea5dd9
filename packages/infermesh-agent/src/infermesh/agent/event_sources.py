"""What changed, as events: pure diffs of policy revisions, gossip member events and target states.

No I/O and no clock: each function turns an old and a new value into `EventDraft`s, which the
recorder (`event_feed.EventRecorder`) numbers and stamps in the journal. The messages are what
`infermesh events` shows, one line each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs

from infermesh.core.model import ModelState
from infermesh.core.policy import Drain, Pin, PolicyKind, PolicySet

__all__ = ["EventDraft", "member_events", "model_events", "policy_events"]


@attrs.frozen
class EventDraft:
    """An event before the journal gives it a seq and a time."""

    kind: str
    action: str
    subject: str
    node: str = ""
    message: str = ""
    attributes: Mapping[str, str] = attrs.field(factory=dict, hash=False)


# --------------------------------------------------------------------------- policy and drains


def policy_events(old: PolicySet, new: PolicySet) -> list[EventDraft]:
    """Drains and undrains (`drain`), set and deleted entries (`policy`), pins and unpins of a
    model (`model`), from one policy revision to the next; attribute `revision` on each."""
    revision = {"revision": str(new.revision)}
    out: list[EventDraft] = []
    for kind in PolicyKind:
        before, after = old.of_kind(kind), new.of_kind(kind)
        for name in sorted(set(before) | set(after)):
            was, now = before.get(name), after.get(name)
            if was == now:
                continue
            subject = f"{kind.value}/{name}"
            if now is None:
                out.append(
                    EventDraft(
                        "policy",
                        "deleted",
                        subject,
                        message=f"{subject} deleted",
                        attributes=revision,
                    )
                )
            else:
                out.append(
                    EventDraft(
                        "policy",
                        "set",
                        subject,
                        message=f"{subject} set",
                        attributes={**revision, "value": _value_json(new, kind, name)},
                    )
                )
            if kind is PolicyKind.DRAINS:
                out.append(_drain_event(name, now, revision))
            elif kind is PolicyKind.PINS:
                out.append(_pin_event(name, now, revision))
    return out


def _value_json(policy: PolicySet, kind: PolicyKind, name: str) -> str:
    value = policy.to_document().get(kind.value, {}).get(name, {})
    return json.dumps(value, sort_keys=True)


def _drain_event(node: str, drain: object, revision: Mapping[str, str]) -> EventDraft:
    if isinstance(drain, Drain):
        reason = f": {drain.reason}" if drain.reason else ""
        return EventDraft(
            "drain",
            "drained",
            node,
            node=node,
            message=f"node {node} drained{reason}",
            attributes={**revision, "reason": drain.reason},
        )
    return EventDraft(
        "drain", "undrained", node, node=node, message=f"node {node} undrained", attributes=revision
    )


def _pin_event(model: str, pin: object, revision: Mapping[str, str]) -> EventDraft:
    if isinstance(pin, Pin):
        nodes = ",".join(pin.nodes)
        return EventDraft(
            "model",
            "pinned",
            model,
            message=f"model {model} pinned to {', '.join(pin.nodes)} "
            f"(min_replicas {pin.min_replicas})",
            attributes={**revision, "nodes": nodes, "min_replicas": str(pin.min_replicas)},
        )
    return EventDraft(
        "model", "unpinned", model, message=f"model {model} unpinned", attributes=revision
    )


# --------------------------------------------------------------------------- gossip members

_MEMBER_ACTIONS = {
    "joined": ("joined", "joined the mesh"),
    "alive": ("alive", "is alive again"),
    "suspect": ("suspect", "is suspected of having failed (no answer to probes)"),
    "dead": ("failed", "failed (confirmed dead by the mesh)"),
    "left": ("left", "left the mesh"),
    "updated": ("updated", "changed its address or metadata"),
}


def member_events(kind: str, node: str, incarnation: int) -> list[EventDraft]:
    """One `node` event for a gossip MemberEvent (`dead` is reported as `failed`)."""
    action, text = _MEMBER_ACTIONS.get(kind, (kind, kind))
    return [
        EventDraft(
            "node",
            action,
            node,
            node=node,
            message=f"node {node} {text}",
            attributes={"incarnation": str(incarnation)},
        )
    ]


# --------------------------------------------------------------------------- targets


def model_events(old: ModelState | None, new: ModelState) -> list[EventDraft]:
    """`model` events from one target's state to the next: target added/removed (first seen or
    loaded again / no longer loaded), healthy/unhealthy, and LoRA adapters that appeared
    (`loaded`) or disappeared (`unloaded`). Attributes: `endpoint`, and `target` for the base."""
    key = new.key
    where = f"on {key.node} ({key.endpoint})"
    base = {"endpoint": key.endpoint, "target": key.target_id}
    out: list[EventDraft] = []

    def add(action: str, subject: str, message: str, **extra: str) -> None:
        out.append(EventDraft("model", action, subject, key.node, message, {**base, **extra}))

    was_loaded = old is not None and old.loaded
    if new.loaded and not was_loaded:
        add("added", key.model, f"model {key.model} is served {where}")
    elif was_loaded and not new.loaded:
        add("removed", key.model, f"model {key.model} is no longer served {where}")
    was_healthy = old.healthy if old is not None else True
    if was_healthy != new.healthy:
        if new.healthy:
            add("healthy", key.model, f"model {key.model} {where} is healthy again")
        else:
            reason = new.health_reason or "no reason given"
            add(
                "unhealthy",
                key.model,
                f"model {key.model} {where} is unhealthy: {reason}",
                reason=reason,
            )
    before = set(old.adapters) if old is not None else set()
    after = set(new.adapters)
    for adapter in sorted(after - before):
        add("loaded", adapter, f"LoRA adapter {adapter} loaded {where}", base_model=key.model)
    for adapter in sorted(before - after):
        add("unloaded", adapter, f"LoRA adapter {adapter} unloaded {where}", base_model=key.model)
    return out

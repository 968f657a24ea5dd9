"""Feeds the event journal from the agent's parts: the state store, gossip and the policy watch.

The shell around `event_sources`' pure diffs: it remembers the last state of each target (one
entry per target, as the store does) and the last policy, and appends what changed to the
journal. Every hook is synchronous and cheap, so it can run inside the store's write path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from infermesh.agent.event_sources import (
    EventDraft,
    member_events,
    model_events,
    policy_events,
)
from infermesh.agent.events import EventJournal
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.core.policy import PolicySet
from infermesh.core.scoring.state import StateStore, Subscription

if TYPE_CHECKING:
    from infermesh.agent.gossip.members import MemberEvent

__all__ = ["EventRecorder"]


class EventRecorder:
    """Turns changes into journal events; `watch_store` once, then the daemon calls the hooks."""

    def __init__(self, journal: EventJournal) -> None:
        self.journal = journal
        self._targets: dict[TargetKey, ModelState] = {}
        self._policy: PolicySet | None = None

    def record(self, drafts: Iterable[EventDraft]) -> None:
        for draft in drafts:
            self.journal.append(
                draft.kind, draft.action, draft.subject, draft.node, draft.message, draft.attributes
            )

    # ------------------------------------------------------------------ targets

    def watch_store(self, store: StateStore) -> Subscription[ModelStateDelta]:
        """Record model events for every later change of a target (local or learned by gossip);
        the targets the store holds now are the baseline, not events."""
        for state in store.model_states():
            self._targets[state.key] = state

        def on_delta(delta: ModelStateDelta) -> None:
            new = store.get_model(delta.key)
            if new is not None:
                self.on_target(new)

        return store.subscribe_models(on_delta)

    def on_target(self, new: ModelState) -> None:
        old = self._targets.get(new.key)
        self._targets[new.key] = new
        self.record(model_events(old, new))

    # ------------------------------------------------------------------ gossip

    def on_member(self, event: MemberEvent) -> None:
        """A gossip member changed state (joined, suspect, dead, left, alive again)."""
        self.record(member_events(event.kind, event.member_id, event.incarnation))

    # ------------------------------------------------------------------ policy

    def on_policy(self, policy: PolicySet) -> None:
        """The policy in force changed: record what differs from the last one seen (the first
        one seen is the baseline: what the agent loaded at start-up is not news)."""
        old, self._policy = self._policy, policy
        if old is not None and policy.revision != old.revision:
            self.record(policy_events(old, policy))

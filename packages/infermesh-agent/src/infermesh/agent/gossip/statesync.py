"""The gossip view of every node's runtime and GPU states, merged into the agent's StateStore.

Sans-I/O: it stamps this node's states with gossip versions, picks entries to piggyback, and
merges entries heard from others (newest version wins, age kept on the local clock). It never
sends, reads a clock or trusts an entry it was handed.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from typing import Any

import attrs

from infermesh.agent.gossip.broadcasts import retransmit_limit
from infermesh.agent.gossip.values import StateEntry
from infermesh.core.model import (
    GpuKey,
    GpuState,
    GpuStateDelta,
    ModelState,
    ModelStateDelta,
    TargetKey,
)
from infermesh.core.scoring.state import StateStore

__all__ = ["VERSIONS_PER_EPOCH", "StateBook", "StateEntry"]

State = ModelState | GpuState
Key = TargetKey | GpuKey

VERSIONS_PER_EPOCH = 1_000_000
"""Gossip versions are `epoch * VERSIONS_PER_EPOCH + 2 * counter`: with the agent's start time
in milliseconds as its epoch, a restarted origin outbids everything its earlier life sent."""

# Fields whose change is published at once: they decide whether and how a target is chosen.
_URGENT_MODEL_FIELDS = (
    "healthy",
    "health_reason",
    "loaded",
    "warming",
    "running",
    "waiting",
    "adapters",
)
# Everything a delta carries: a gossiped state is whole, so the store's copy is replaced whole.
_MODEL_FIELDS = tuple(f.name for f in attrs.fields(ModelState) if f.name not in ("key", "version"))
_GPU_FIELDS = tuple(f.name for f in attrs.fields(GpuState) if f.name not in ("key", "version"))


@attrs.define
class _Known:
    """A state as this node holds it: `last_updated` on this node's clock, gossip version."""

    origin: str
    state: State
    version: int


@attrs.define
class _Own:
    """One of this node's keys: what was last stamped, and a coalesced newer reading if any."""

    sent: State
    stamped_at: float
    counter: int
    pending: State | None = None
    due_s: float = math.inf


@attrs.define
class _Queued:
    transmits: int
    order: int


class StateBook:
    """Node states by key, with the gossip queue that spreads the changed ones.

    This node's states come in through `publish` (from its own store); other nodes' arrive
    through `merge` and are written to the store as whole states (`last_updated = now - age`,
    `version` = the origin's gossip version). A change is piggybacked `retransmit_limit` times
    by `take`, newest state per key only, and every node that merges it relays it (epidemic
    spread); a relay computes the age from its stored `last_updated`, so age keeps growing.

    Publishing is rate-limited per key so the gossip load is bounded: a change to health,
    loaded, warming, running, waiting or adapters goes out at once; another change at most
    every `min_publish_interval_s`; a reading whose only change is `last_updated` every
    `refresh_s`, often enough that receivers never see a steady state go stale.

    `node_gone` marks a dead or departed node's targets unhealthy at an odd version (the last
    one + 1): local verdicts that are never gossiped, and that the origin's next real (even,
    larger) version overrides after a refutation or a restart.
    """

    def __init__(
        self,
        self_node: str,
        store: StateStore,
        *,
        epoch: int,
        retransmit_mult: int = 4,
        min_publish_interval_s: float = 0.5,
        refresh_s: float = 2.0,
    ) -> None:
        if not self_node:
            raise ValueError("StateBook needs this node's id")
        if epoch < 0:
            raise ValueError(f"gossip epoch must be >= 0, got {epoch}")
        if retransmit_mult < 1:
            raise ValueError(f"retransmit_mult must be >= 1, got {retransmit_mult}")
        if not 0 <= min_publish_interval_s <= refresh_s:
            raise ValueError(
                f"need 0 <= min_publish_interval_s ({min_publish_interval_s}) "
                f"<= refresh_s ({refresh_s})"
            )
        self.self_node = self_node
        self.store = store
        self._epoch = epoch
        self._retransmit_mult = retransmit_mult
        self.min_publish_interval_s = min_publish_interval_s
        self.refresh_s = refresh_s
        self._known: dict[Key, _Known] = {}
        self._keys_by_node: dict[str, set[Key]] = {}
        self._own: dict[Key, _Own] = {}
        self._pending: set[Key] = set()
        self._queue: dict[Key, _Queued] = {}
        self._order = 0
        self._gone: set[str] = set()
        self.states_published = 0
        """Versions this node stamped on its own states."""
        self.entries_merged = 0
        """Remote entries that changed a state."""
        self.entries_stale = 0
        """Remote entries not newer than what this node holds."""
        self.entries_rejected = 0
        """Remote entries that were malformed (origin not the key's node, bad age or version)."""

    # ------------------------------------------------------------------ this node's states

    def publish(self, now: float, state: State) -> None:
        """This node's `state` changed (as its own store now holds it)."""
        key = state.key
        if key.node != self.self_node:
            raise ValueError(
                f"{self.self_node} can only publish its own states, got one of node {key.node!r}"
            )
        own = self._own.get(key)
        if own is None or _urgent_change(own.sent, state):
            self._stamp(now, state)
            return
        if not _same_content(own.sent, state):
            due_s = own.stamped_at + self.min_publish_interval_s
        elif state.last_updated > own.sent.last_updated:
            due_s = own.stamped_at + self.refresh_s
        else:
            return  # nothing newer than what was stamped
        if now >= due_s:
            self._stamp(now, state)
        else:
            own.pending, own.due_s = state, due_s
            self._pending.add(key)

    def _stamp(self, now: float, state: State) -> None:
        key = state.key
        own = self._own.get(key)
        counter = 1 if own is None else own.counter + 1
        version = self._epoch * VERSIONS_PER_EPOCH + 2 * counter
        stamped = attrs.evolve(state, version=version)
        self._own[key] = _Own(sent=stamped, stamped_at=now, counter=counter)
        self._pending.discard(key)
        self._remember(_Known(self.self_node, stamped, version))
        self._enqueue(key)
        self.states_published += 1

    def _flush_due(self, now: float) -> None:
        """Stamp the coalesced readings whose wait is over."""
        for key in [k for k in self._pending if now >= self._own[k].due_s]:
            pending = self._own[key].pending
            assert pending is not None
            self._stamp(now, pending)

    # ------------------------------------------------------------------ outgoing

    def _enqueue(self, key: Key) -> None:
        self._order += 1
        self._queue[key] = _Queued(transmits=0, order=self._order)

    def take(self, now: float, max_entries: int, cluster_size: int) -> tuple[StateEntry, ...]:
        """Entries to piggyback on the next packet: least-sent first, newest first among equals.

        Each counts as sent once more; one sent `retransmit_limit(retransmit_mult, cluster_size)`
        times leaves the queue. A key is queued once, with its newest state.
        """
        self._flush_due(now)
        if max_entries <= 0 or not self._queue:
            return ()
        limit = max(1, retransmit_limit(self._retransmit_mult, cluster_size))
        chosen = heapq.nsmallest(
            max_entries, self._queue.items(), key=lambda item: (item[1].transmits, -item[1].order)
        )
        entries = []
        for key, queued in chosen:
            queued.transmits += 1
            if queued.transmits >= limit:
                del self._queue[key]
            entries.append(self._entry(now, self._known[key]))
        return tuple(entries)

    def snapshot(self, now: float) -> tuple[StateEntry, ...]:
        """Every state of every live node (this one included), aged to `now`: for push-pull."""
        return tuple(
            self._entry(now, known)
            for known in self._known.values()
            if known.version % 2 == 0 and known.origin not in self._gone
        )

    @staticmethod
    def _entry(now: float, known: _Known) -> StateEntry:
        age_s = max(0.0, now - known.state.last_updated)
        return StateEntry(known.origin, known.state, known.version, age_s)

    # ------------------------------------------------------------------ incoming

    def merge(self, now: float, entries: Iterable[StateEntry]) -> int:
        """Apply other nodes' entries to the store; returns how many changed a state.

        This node's own entries (echoed back) are ignored; an entry not newer than the held
        state is counted in `entries_stale`; a malformed one in `entries_rejected`. Each change
        is queued to be gossiped on.
        """
        changed = 0
        for entry in entries:
            if entry.origin == self.self_node:
                continue
            if not _well_formed(entry):
                self.entries_rejected += 1
                continue
            key = entry.state.key
            known = self._known.get(key)
            if known is not None and entry.version <= known.version:
                self.entries_stale += 1
                continue
            stored = attrs.evolve(
                entry.state, version=entry.version, last_updated=now - entry.age_s
            )
            if not self._write(stored):
                self.entries_stale += 1
                continue
            self._remember(_Known(entry.origin, stored, entry.version))
            self._gone.discard(entry.origin)
            self._enqueue(key)
            self.entries_merged += 1
            changed += 1
        return changed

    def node_gone(self, now: float, node: str, reason: str) -> None:
        """`node` is dead or left (`reason`): mark its targets unhealthy, stop spreading them."""
        if node == self.self_node:
            return
        self._gone.add(node)
        for key in self._keys_by_node.get(node, ()):
            self._queue.pop(key, None)
            known = self._known[key]
            if not isinstance(known.state, ModelState) or known.version % 2 == 1:
                continue  # GPUs have no health flag; an odd version is already a mark
            version = known.version + 1
            marked = attrs.evolve(
                known.state,
                version=version,
                healthy=False,
                health_reason=f"node {node} is {reason} (gossip)",
            )
            if self._write(marked):
                self._known[key] = _Known(node, marked, version)

    def node_back(self, now: float, node: str) -> None:
        """`node` is alive again: its states count as live; its next entries outbid the marks."""
        self._gone.discard(node)

    # ------------------------------------------------------------------ reads

    def known_nodes(self) -> tuple[str, ...]:
        """Every node with at least one known state (this one included once it published)."""
        return tuple(sorted(node for node, keys in self._keys_by_node.items() if keys))

    def version_of(self, key: Key) -> int | None:
        """The gossip version held for `key`, None if unknown."""
        known = self._known.get(key)
        return None if known is None else known.version

    # ------------------------------------------------------------------ helpers

    def _remember(self, known: _Known) -> None:
        key = known.state.key
        self._known[key] = known
        self._keys_by_node.setdefault(known.origin, set()).add(key)

    def _write(self, state: State) -> bool:
        """Write a whole state to the store; False when the store holds a newer version."""
        if isinstance(state, ModelState):
            changes = _changes(state, _MODEL_FIELDS)
            return self.store.apply_model_delta(ModelStateDelta(state.key, state.version, changes))
        changes = _changes(state, _GPU_FIELDS)
        return self.store.apply_gpu_delta(GpuStateDelta(state.key, state.version, changes))


def _changes(state: State, fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(state, name) for name in fields}


def _well_formed(entry: StateEntry) -> bool:
    """An entry whose origin owns the key, with a usable version and age."""
    state = entry.state
    if not isinstance(state, ModelState | GpuState):
        return False
    if not entry.origin or state.key.node != entry.origin:
        return False
    if not isinstance(entry.version, int) or entry.version < 0:
        return False
    age_s = entry.age_s
    return isinstance(age_s, int | float) and math.isfinite(age_s) and age_s >= 0.0


def _same_content(old: State, new: State) -> bool:
    """Equal in everything but `version` and `last_updated`."""
    return attrs.evolve(new, version=old.version, last_updated=old.last_updated) == old


def _urgent_change(old: State, new: State) -> bool:
    """A change receivers must see at once: it decides whether and how a target is chosen."""
    if isinstance(old, ModelState) and isinstance(new, ModelState):
        return any(getattr(old, name) != getattr(new, name) for name in _URGENT_MODEL_FIELDS)
    if isinstance(old, GpuState) and isinstance(new, GpuState):
        return old.health != new.health
    return True

"""The fused state store: every target's ModelState and every GPU's GpuState this agent knows.

Sans-I/O and single-writer: deltas are applied by synchronous calls on the event-loop thread, so
each one lands atomically; readers get immutable tuples (per-model candidate lists, rebuilt
lazily on the first read after a write: a value change replaces one entry of a per-model dict,
only a membership change re-sorts) and never scan the cluster. A delta also computes the new
state's scoring features (measured decode rate, service time: capacity.StateFeatures) and its
`rows.CandidateRow`, patched into its models' row lists in place, so decisions read one
precomputed row per candidate. Never awaits, reads a clock or logs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import attrs

from infermesh.core.model import (
    GpuKey,
    GpuState,
    GpuStateDelta,
    ModelState,
    ModelStateDelta,
    TargetKey,
)
from infermesh.core.scoring.capacity import forget_features
from infermesh.core.scoring.rows import CandidateRow, candidate_row, row_field

__all__ = ["ApplyCounts", "StateStore", "Subscription"]

_D = TypeVar("_D")
_ROW_STATE = row_field("state")


@attrs.define
class ApplyCounts:
    """How many deltas changed state and how many were stale (not newer than the state)."""

    applied: int = 0
    stale: int = 0


class Subscription(Generic[_D]):
    """A registered listener; `close()` stops delivery."""

    def __init__(self, listeners: list[Callable[[_D], None]], callback: Callable[[_D], None]):
        self._listeners = listeners
        self._callback = callback

    def close(self) -> None:
        if self._callback in self._listeners:
            self._listeners.remove(self._callback)


class StateStore:
    """Targets and GPUs keyed by identity, with per-model candidate lists kept up to date.

    A target is a candidate for model `m` when its key's model is `m` or it lists `m` among its
    (LoRA) adapters. Targets are never forgotten: a model that disappears is reported by its
    adapter as `loaded=False`, so `model_known` stays true for a model that was ever served.
    """

    def __init__(self) -> None:
        self._models: dict[TargetKey, ModelState] = {}
        self._by_target_id: dict[str, ModelState] = {}
        # Per model: its members by key (written on every delta, O(1)), their keys in order
        # (re-sorted only when membership changes) and the ordered states (rebuilt on the first
        # read after any change); a model is dirty while its cached tuple is out of date.
        self._members: dict[str, dict[TargetKey, ModelState]] = {}
        self._order: dict[str, tuple[TargetKey, ...]] = {}
        self._candidates: dict[str, tuple[ModelState, ...]] = {}
        self._dirty: set[str] = set()
        # Every target's CandidateRow; per model, the rows in candidate order (patched in place
        # on a value change, dropped on a membership change) and each key's position in them.
        self._rows: dict[TargetKey, CandidateRow] = {}
        self._row_lists: dict[str, list[CandidateRow]] = {}
        self._positions: dict[str, dict[TargetKey, int]] = {}
        self._gpus: dict[GpuKey, GpuState] = {}
        self._gpus_by_node: dict[str, tuple[GpuState, ...]] = {}
        self._model_listeners: list[Callable[[ModelStateDelta], None]] = []
        self._gpu_listeners: list[Callable[[GpuStateDelta], None]] = []
        self.model_counts = ApplyCounts()
        self.gpu_counts = ApplyCounts()

    # ------------------------------------------------------------------ writes

    def apply_model_delta(self, delta: ModelStateDelta) -> bool:
        """Apply one delta; False (and nothing changes) when it is not newer than the state."""
        old = self._models.get(delta.key)
        new = ModelState.from_delta(delta) if old is None else old.apply(delta)
        if new is old:
            self.model_counts.stale += 1
            return False
        self._models[delta.key] = new
        self._by_target_id[delta.key.target_id] = new
        # Per-state features the scorers read on every decision, computed here, once per change.
        forget_features(old)
        row = self._rows[delta.key] = candidate_row(new)
        old_names = _served_names(old) if old is not None else frozenset()
        for name in old_names | _served_names(new):
            self._reindex(name, new, row)
        self.model_counts.applied += 1
        for listener in tuple(self._model_listeners):
            listener(delta)
        return True

    def apply_gpu_delta(self, delta: GpuStateDelta) -> bool:
        """Apply one GPU delta; False (and nothing changes) when it is stale."""
        old = self._gpus.get(delta.key)
        new = GpuState.from_delta(delta) if old is None else old.apply(delta)
        if new is old:
            self.gpu_counts.stale += 1
            return False
        self._gpus[delta.key] = new
        node = delta.key.node
        others = [g for g in self._gpus_by_node.get(node, ()) if g.key != delta.key]
        self._gpus_by_node[node] = tuple(sorted([*others, new], key=_gpu_order))
        self.gpu_counts.applied += 1
        for listener in tuple(self._gpu_listeners):
            listener(delta)
        return True

    def apply_model_deltas(self, deltas: Iterable[ModelStateDelta]) -> ApplyCounts:
        counts = ApplyCounts()
        for delta in deltas:
            if self.apply_model_delta(delta):
                counts.applied += 1
            else:
                counts.stale += 1
        return counts

    def _reindex(self, name: str, changed: ModelState, row: CandidateRow) -> None:
        # Only the changed target's membership can differ: O(1) here; the ordered tuple is
        # rebuilt by the next read (`candidates`), re-sorted only when membership changed; the
        # model's rows are patched in place unless membership changed.
        members = self._members.get(name)
        if members is None:
            members = self._members[name] = {}
        key = changed.key
        if name in _served_names(changed):
            if key not in members:
                self._forget_order(name)
            else:
                positions = self._positions.get(name)
                if positions is not None:
                    self._row_lists[name][positions[key]] = row
            members[key] = changed
        elif members.pop(key, None) is not None:
            self._forget_order(name)
        self._dirty.add(name)

    def _forget_order(self, name: str) -> None:
        self._order.pop(name, None)
        self._positions.pop(name, None)
        self._row_lists.pop(name, None)

    # ------------------------------------------------------------------ reads

    def candidates(self, model: str) -> tuple[ModelState, ...]:
        """Every target that serves or once served `model` (loaded or not), ordered by key.

        The same tuple object is returned until a target of the model changes."""
        if model in self._dirty:
            self._refresh(model)
        return self._candidates.get(model, ())

    def candidate_keys(self, model: str) -> tuple[TargetKey, ...]:
        """The keys of `candidates(model)`, in the same order; the same tuple object is
        returned until the model's membership changes (not when a target's state does)."""
        order = self._order.get(model)
        if order is None:
            if model not in self._members:
                return ()
            order = self._sort(model)
        return order

    def candidate_rows(self, model: str) -> Sequence[CandidateRow]:
        """The `CandidateRow`s of `candidates(model)`, in the same order (what a decision
        reads). The list is the store's own, kept up to date in place: read it, never change
        it, and do not keep it across writes."""
        rows = self._row_lists.get(model)
        if rows is None:
            keys = self.candidate_keys(model)
            if not keys:
                return []
            rows = self._row_lists[model] = list(map(self._rows.__getitem__, keys))
            self._positions[model] = {key: i for i, key in enumerate(keys)}
        return rows

    def _sort(self, model: str) -> tuple[TargetKey, ...]:
        members = self._members.get(model, {})
        order = self._order[model] = tuple(
            sorted(members, key=lambda k: (k.node, k.endpoint, k.model))
        )
        return order

    def _refresh(self, model: str) -> None:
        # From the rows (kept in order, patched in place): no key is hashed, so a 10,000-target
        # model's tuple costs a C-speed copy, not 10,000 Python-level key hashes.
        self._dirty.discard(model)
        self._candidates[model] = tuple(map(_ROW_STATE, self.candidate_rows(model)))

    def model_known(self, model: str) -> bool:
        return model in self._members

    def model_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._members))

    def get_model(self, key: TargetKey) -> ModelState | None:
        return self._models.get(key)

    def get_target(self, target_id: str) -> ModelState | None:
        return self._by_target_id.get(target_id)

    def model_states(self) -> tuple[ModelState, ...]:
        return tuple(sorted(self._models.values(), key=_target_order))

    def get_gpu(self, key: GpuKey) -> GpuState | None:
        return self._gpus.get(key)

    def gpu_states(self) -> tuple[GpuState, ...]:
        return tuple(sorted(self._gpus.values(), key=_gpu_order))

    @property
    def gpus_by_node(self) -> Mapping[str, tuple[GpuState, ...]]:
        """Each node's GPUs, ordered (read-only; `gpus_for` without a `gpu_uuid` label)."""
        return self._gpus_by_node

    def gpus_for(self, state: ModelState) -> tuple[GpuState, ...]:
        """The GPUs a target runs on: those named in its `gpu_uuid` label (comma-separated), or
        every GPU of its node when the label is empty."""
        node_gpus = self._gpus_by_node.get(state.key.node, ())
        wanted = state.labels.gpu_uuid
        if not wanted:
            return node_gpus
        uuids = {u.strip() for u in wanted.split(",") if u.strip()}
        return tuple(g for g in node_gpus if g.key.gpu_uuid in uuids)

    # ------------------------------------------------------------------ watchers

    def subscribe_models(
        self, callback: Callable[[ModelStateDelta], None]
    ) -> Subscription[ModelStateDelta]:
        """Call `callback(delta)` after every applied model delta (synchronously, on write)."""
        self._model_listeners.append(callback)
        return Subscription(self._model_listeners, callback)

    def subscribe_gpus(
        self, callback: Callable[[GpuStateDelta], None]
    ) -> Subscription[GpuStateDelta]:
        self._gpu_listeners.append(callback)
        return Subscription(self._gpu_listeners, callback)


def _served_names(state: ModelState) -> frozenset[str]:
    return frozenset((state.key.model, *state.adapters))


def _target_order(state: ModelState) -> tuple[str, str, str]:
    key = state.key
    return (key.node, key.endpoint, key.model)


def _gpu_order(state: GpuState) -> tuple[str, int, str]:
    return (state.key.node, state.index, state.key.gpu_uuid)

"""Which GPUs serve which replica: the `gpu_uuid` label of a runtime's targets.

A target's GPUs are named by its `gpu_uuid` label (comma-separated UUIDs, see
`StateStore.gpus_for`). Three sources fill it, in this order of precedence:

1. the runtime's `gpus = [...]` in the config (the operator knows best);
2. what the runtime adapter reports (Triton: the `gpu_uuid` labels of its metrics);
3. what a `ReplicaGpuFinder` discovers (the `nvml` GPU adapter: the GPUs NVML lists the
   replica's processes on), applied with the runtime's next reading.

The label travels with the target's state (State API, gossip, the routers' replicas), so every
scorer on every node sees the same mapping. Sans-I/O: the agent runs the finder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from infermesh.core.model import Labels, ModelState, ModelStateDelta, TargetKey

__all__ = ["GpuAssigner", "ReplicaGpuFinder", "ReplicaGpus", "gpu_label"]


def gpu_label(uuids: Sequence[str]) -> str:
    """The `gpu_uuid` label value for `uuids`: comma-separated, blanks dropped, order kept."""
    return ",".join(u.strip() for u in uuids if u.strip())


@attrs.frozen
class ReplicaGpus:
    """What discovery found for one runtime URL: its GPUs (GpuKey `gpu_uuid` values, MIG
    instances as `<GPU UUID>/gi<id>`), the processes that led there, and, when it found no GPU,
    why (an operator can act on it: e.g. "set [[runtimes]] gpus")."""

    gpus: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    reason: str = ""


@runtime_checkable
class ReplicaGpuFinder(Protocol):
    """A GPU adapter that can tell which of this node's GPUs a local runtime runs on.

    The agent calls `replica_gpus` every `replica_discovery_interval_s` (0: never) for the
    runtimes without `gpus` in the config. It must not raise for a runtime it cannot map: it
    answers an empty `ReplicaGpus` with the reason instead.
    """

    replica_discovery_interval_s: float

    async def replica_gpus(self, urls: Sequence[str]) -> Mapping[str, ReplicaGpus]: ...


@attrs.define
class GpuAssigner:
    """Sets the `gpu_uuid` label of one runtime's targets.

    `uuids` are the configured GPUs (a `gpu_label`, "" when none); `discovered` is what a
    `ReplicaGpuFinder` found (set by the agent, "" until then). `assign(delta)` returns the delta
    to apply: the configured GPUs win, then the label the runtime adapter itself reports, then
    the discovered ones; a delta that needs no change is returned as is. A delta without labels
    gets the target's stored labels (or, for its first delta, fresh labels) carrying the GPUs
    when they differ from what the store holds, so a newly discovered mapping lands with the
    runtime's next reading. `current(key)` reads a target's state from the store (None: not seen
    yet), e.g. `StateStore.get_model`.
    """

    uuids: str
    current: Callable[[TargetKey], ModelState | None]
    discovered: str = ""
    _reported: dict[TargetKey, str] = attrs.field(factory=dict, init=False)
    """Per target, the `gpu_uuid` label its runtime adapter last reported."""

    def assign(self, delta: ModelStateDelta) -> ModelStateDelta:
        changes = delta.changes
        labels = changes.get("labels")
        if isinstance(labels, Labels):
            self._reported[delta.key] = labels.gpu_uuid
        wanted = self.uuids or self._reported.get(delta.key, "") or self.discovered
        if not wanted:
            return delta
        if isinstance(labels, Labels):
            if labels.gpu_uuid == wanted:
                return delta
            fixed = attrs.evolve(labels, gpu_uuid=wanted)
        else:
            current = self.current(delta.key)
            if current is None:
                fixed = Labels(gpu_uuid=wanted)
            elif current.labels.gpu_uuid == wanted:
                return delta
            else:
                fixed = attrs.evolve(current.labels, gpu_uuid=wanted)
        return ModelStateDelta(delta.key, delta.version, {**changes, "labels": fixed})

"""Which GPUs serve which replica: `[[runtimes]] gpus` written into its targets' labels.

A target's GPUs are named by its `gpu_uuid` label (comma-separated UUIDs, see
`StateStore.gpus_for`): an adapter that discovers them fills it (Triton: the `gpu_uuid` labels
of its metrics), and a runtime's `gpus = [...]` in the config sets it for every target of that
runtime, replacing what the adapter discovered (the operator knows best). The label travels
with the target's state (State API, gossip, the routers' replicas), so every scorer on every
node sees the same mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from infermesh.core.model import Labels, ModelState, ModelStateDelta, TargetKey

__all__ = ["GpuAssigner", "gpu_label"]


def gpu_label(uuids: Sequence[str]) -> str:
    """The `gpu_uuid` label value for `uuids`: comma-separated, blanks dropped, order kept."""
    return ",".join(u.strip() for u in uuids if u.strip())


@attrs.frozen
class GpuAssigner:
    """Sets the `gpu_uuid` label of one runtime's targets to the configured GPUs.

    `assign(delta)` returns the delta to apply: unchanged without configured GPUs; else its
    labels (or, for a target's first delta without labels, fresh labels) carry the GPUs.
    `current(key)` reads a target's state from the store (None: not seen yet), e.g.
    `StateStore.get_model`.
    """

    uuids: str
    current: Callable[[TargetKey], ModelState | None]

    def assign(self, delta: ModelStateDelta) -> ModelStateDelta:
        uuids = self.uuids
        if not uuids:
            return delta
        changes = delta.changes
        labels = changes.get("labels")
        if isinstance(labels, Labels):
            if labels.gpu_uuid == uuids:
                return delta
            fixed = attrs.evolve(labels, gpu_uuid=uuids)
        elif self.current(delta.key) is None:
            fixed = Labels(gpu_uuid=uuids)
        else:
            return delta
        return ModelStateDelta(delta.key, delta.version, {**changes, "labels": fixed})

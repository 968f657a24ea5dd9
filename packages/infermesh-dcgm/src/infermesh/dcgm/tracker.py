"""Turns successive readings of a node's GPUs into GpuStateDeltas (sans-I/O).

Shared by the dcgm-exporter and NVML adapters. A GPU whose values did not change produces no
delta; a GPU that disappears from the source keeps its last state (it turns stale as its
`last_updated` ages), because a missing series is not evidence of a broken GPU.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from infermesh.core.model import GpuKey, GpuState, GpuStateDelta

__all__ = ["GpuTracker"]


class GpuTracker:
    """Versions GPU states and yields what changed since the last reading."""

    def __init__(self, first_version: int) -> None:
        self._version = first_version
        self._states: dict[GpuKey, GpuState] = {}

    @property
    def states(self) -> Mapping[GpuKey, GpuState]:
        return dict(self._states)

    def commit(self, new_states: Mapping[GpuKey, GpuState]) -> list[GpuStateDelta]:
        """Deltas for the states in `new_states` that differ from the last ones (time included)."""
        deltas = []
        for key, new in new_states.items():
            old = self._states.get(key)
            if old is not None and attrs.evolve(new, version=old.version) == old:
                continue
            self._version += 1
            versioned = attrs.evolve(new, version=self._version)
            deltas.append((old or GpuState(key=key)).delta_to(versioned))
            self._states[key] = versioned
        return deltas

"""The router's replica of its agent's model and GPU state, rebuilt on every connection, and of
the agent's network RTT estimates to other nodes (`NodeRtts`).

Each connection to the agent fills a fresh `StateStore` from the watch streams' snapshots; it
replaces the live store only once it holds every target and GPU the agent listed when the
connection began, so a router never routes on half a snapshot, and a restarted agent whose
versions went backwards is still taken as it is. Until then, and while disconnected, the last
live store keeps serving (the engine's freshness filter retires it after `stale_after_s`).
Sans-I/O: the caller passes `now`; never awaits, reads a clock or logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

from infermesh.core.model import GpuKey, GpuStateDelta, ModelStateDelta
from infermesh.core.scoring.state import StateStore

__all__ = ["MAX_NODE_ID_CHARS", "NodeRtts", "ReplicaStatus", "StateReplica"]

MAX_NODE_ID_CHARS = 256
"""Longer node ids in an RTT listing are skipped (the gossip codec refuses them too)."""


class ReplicaStatus:
    """Whether the replica can be routed on, and why not."""

    __slots__ = ("ready", "reason")

    def __init__(self, ready: bool, reason: str) -> None:
        self.ready = ready
        self.reason = reason


class StateReplica:
    """Live and pending state stores, swapped when a connection's snapshot is complete.

    `on_swap(store)` is called with each store that becomes live.
    """

    def __init__(self, on_swap: Callable[[StateStore], None] | None = None) -> None:
        self.live: StateStore | None = None
        """The store requests are ranked on; None until the first snapshot is complete."""
        self._pending: StateStore | None = None
        self._expected_models: dict[str, int] | None = None
        self._expected_gpus: dict[GpuKey, int] | None = None
        self._on_swap = on_swap
        self.connected = False
        """A connection's snapshot is complete and its streams are open."""
        self.syncs = 0
        """Snapshots completed (the first sync and every resync after a reconnection)."""
        self.deltas = 0
        self.disconnected_at: float | None = None
        """When the last synced connection ended (None while connected or never synced)."""

    # ------------------------------------------------------------------ connection events

    def begin(self) -> None:
        """A connection is being opened: deltas from now on fill a fresh pending store."""
        self._pending = StateStore()
        self._expected_models = None
        self._expected_gpus = None

    def expect(self, models: Mapping[str, int], gpus: Mapping[GpuKey, int]) -> bool:
        """What the agent listed after the streams opened: target id / GPU key -> version.

        The snapshot is complete once the pending store holds each of them at that version or
        newer. Returns True when that made the pending store live.
        """
        if self._pending is None:
            return False
        self._expected_models = dict(models)
        self._expected_gpus = dict(gpus)
        return self._try_swap()

    def lost(self, now: float) -> None:
        """The connection ended (or never opened); `now` is a monotonic time."""
        if self.connected:
            self.disconnected_at = now
        self.connected = False
        self._pending = None
        self._expected_models = self._expected_gpus = None

    # ------------------------------------------------------------------ deltas

    def apply_model(self, delta: ModelStateDelta) -> None:
        self.deltas += 1
        pending = self._pending
        if pending is None:
            if self.live is not None and self.connected:
                self.live.apply_model_delta(delta)
            return
        pending.apply_model_delta(delta)
        if self._expected_models is not None:
            self._try_swap()

    def apply_gpu(self, delta: GpuStateDelta) -> None:
        self.deltas += 1
        pending = self._pending
        if pending is None:
            if self.live is not None and self.connected:
                self.live.apply_gpu_delta(delta)
            return
        pending.apply_gpu_delta(delta)
        if self._expected_gpus is not None:
            self._try_swap()

    def _try_swap(self) -> bool:
        pending = self._pending
        models, gpus = self._expected_models, self._expected_gpus
        if pending is None or models is None or gpus is None:
            return False
        for target_id, version in models.items():
            state = pending.get_target(target_id)
            if state is None or state.version < version:
                return False
        for key, version in gpus.items():
            gpu = pending.get_gpu(key)
            if gpu is None or gpu.version < version:
                return False
        self.live = pending
        self._pending = None
        self._expected_models = self._expected_gpus = None
        self.connected = True
        self.disconnected_at = None
        self.syncs += 1
        if self._on_swap is not None:
            self._on_swap(pending)
        return True

    # ------------------------------------------------------------------ status

    def status(self, now: float, stale_after_s: float, agent: str) -> ReplicaStatus:
        """Ready while connected, and for `stale_after_s` after a connection is lost.

        `now` is a monotonic time; `agent` names the agent in the reason.
        """
        if self.live is None:
            return ReplicaStatus(
                False,
                f"the router has no state from the InferMesh agent at {agent} yet; check that "
                "`infermesh agent run` is running and that --agent points at its socket",
            )
        if self.connected or self.disconnected_at is None:
            return ReplicaStatus(True, "ok")
        down_s = now - self.disconnected_at
        if down_s <= stale_after_s:
            return ReplicaStatus(True, f"reconnecting to the agent at {agent} ({down_s:.1f}s)")
        return ReplicaStatus(
            False,
            f"lost the state stream of the InferMesh agent at {agent} {down_s:.1f}s ago "
            f"(its last state is stale after {stale_after_s:g}s); reconnecting",
        )


class NodeRtts:
    """The agent's estimated RTT (seconds) from its node to each other node, by node id.

    `get` is the local engine's `rtt_estimate`: None for a node without an estimate, which the
    net_penalty scorer treats as local. `replace` swaps in a whole listing at once.
    """

    def __init__(self) -> None:
        self._rtt_s: dict[str, float] = {}
        self.updates = 0
        """Listings taken (`replace` calls)."""

    def get(self, node: str) -> float | None:
        return self._rtt_s.get(node)

    def __len__(self) -> int:
        return len(self._rtt_s)

    def as_dict(self) -> dict[str, float]:
        return dict(self._rtt_s)

    def replace(self, rtts: Iterable[tuple[str, float]]) -> int:
        """Make `rtts` (node id, RTT in seconds) the whole listing; returns how many entries
        were skipped as malformed: an empty or over-long node id, or an RTT that is not a
        finite number >= 0 (the agent's answer is network input)."""
        kept: dict[str, float] = {}
        skipped = 0
        for node, rtt_s in rtts:
            if 0 < len(node) <= MAX_NODE_ID_CHARS and math.isfinite(rtt_s) and rtt_s >= 0.0:
                kept[node] = rtt_s
            else:
                skipped += 1
        self._rtt_s = kept
        self.updates += 1
        return skipped

    def clear(self) -> None:
        self._rtt_s = {}

"""Keeps the discovered GPUs of the runtimes without `[[runtimes]] gpus` up to date.

The agent's GPU adapter that is a `ReplicaGpuFinder` (the `nvml` kind) is asked every
`replica_discovery_interval_s` which GPUs each such runtime runs on; the answer goes to the
runtime's `GpuAssigner`, whose next delta carries it as the targets' `gpu_uuid` label (unless
the runtime adapter reports GPUs of its own). A runtime that cannot be mapped keeps its last
discovered GPUs; the reason is logged once per change. Never raises into the agent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import attrs

from infermesh.core.logging import get_logger
from infermesh.core.scoring.gpu_map import GpuAssigner, ReplicaGpuFinder, ReplicaGpus, gpu_label

__all__ = ["DiscoveredRuntime", "discover_once", "keep_discovering", "replica_gpu_finder"]

log = get_logger("infermesh.agent.gpu_discovery")


@attrs.define
class DiscoveredRuntime:
    """A runtime whose GPUs are discovered, and what was last said about it."""

    name: str
    url: str
    assigner: GpuAssigner
    reason: str = ""


def replica_gpu_finder(gpu_adapters: Sequence[tuple[str, Any]]) -> ReplicaGpuFinder | None:
    """The first GPU adapter that discovers replicas' GPUs with a non-zero interval."""
    for _, adapter in gpu_adapters:
        if isinstance(adapter, ReplicaGpuFinder) and adapter.replica_discovery_interval_s > 0:
            return adapter
    return None


async def discover_once(finder: ReplicaGpuFinder, runtimes: Sequence[DiscoveredRuntime]) -> None:
    """Ask the finder once and hand each runtime's GPUs to its assigner."""
    try:
        found = await finder.replica_gpus([runtime.url for runtime in runtimes])
    except Exception as exc:  # a plugin's bug must not stop the agent
        log.error("replica GPU discovery failed", error=f"{type(exc).__name__}: {exc}")
        return
    for runtime in runtimes:
        answer = found.get(runtime.url, ReplicaGpus(reason="the GPU adapter gave no answer"))
        label = gpu_label(answer.gpus)
        if label:
            if label != runtime.assigner.discovered:
                log.info(
                    "runtime GPUs discovered",
                    runtime=runtime.name,
                    gpus=label,
                    pids=list(answer.pids),
                )
            runtime.assigner.discovered = label
            runtime.reason = ""
        elif answer.reason != runtime.reason:
            runtime.reason = answer.reason
            log.info(
                "runtime GPUs not discovered",
                runtime=runtime.name,
                reason=answer.reason,
                keeping=runtime.assigner.discovered or "none",
            )


async def keep_discovering(finder: ReplicaGpuFinder, runtimes: Sequence[DiscoveredRuntime]) -> None:
    """`discover_once` every `replica_discovery_interval_s`, until cancelled."""
    while True:
        await discover_once(finder, runtimes)
        await anyio.sleep(finder.replica_discovery_interval_s)

"""The `nvml` kind of `[[gpus]]`: reads this node's GPUs through NVML and streams GpuStateDeltas.

A thin asyncio shell around `nvml_reader` (the NVML calls) and `tracker` (versions and
deltas). NVML calls block, so each read runs in a worker thread and the event loop never
waits on the driver. The factory initialises NVML at agent start: a node without the NVIDIA
driver, or without `nvidia-ml-py` installed, fails to start with a message naming the adapter.
After that `deltas()` never raises: a failed read is logged and the GPUs keep their last values
while their `last_updated` ages.

The adapter is also the agent's `ReplicaGpuFinder`: `replica_gpus(urls)` maps local runtimes
to the GPUs NVML lists their processes on (`proc_reader`, `replica_gpus`), every
`replica_discovery_interval_s` (option; 30 s by default, 0 turns discovery off).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import anyio

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuKey, GpuState, GpuStateDelta
from infermesh.core.scoring.gpu_map import ReplicaGpus
from infermesh.dcgm.nvml_reader import NvmlReader, NvmlReading, NvmlUnavailableError
from infermesh.dcgm.proc_reader import Discovery, discover_replica_gpus
from infermesh.dcgm.reading import device_state
from infermesh.dcgm.tracker import GpuTracker

__all__ = ["NvmlAdapter", "load_nvml", "nvml_states"]

log = get_logger("infermesh.dcgm.nvml")

DISCOVERY_OPTION = "replica_discovery_interval_s"
DEFAULT_DISCOVERY_INTERVAL_S = 30.0


def discovery_interval(options: Mapping[str, Any], where: str) -> float:
    """The `replica_discovery_interval_s` option (seconds, 0: off); ConfigError for any other
    option or a value that is not a number >= 0."""
    others = sorted(set(options) - {DISCOVERY_OPTION})
    if others:
        raise ConfigError(
            f"{where}: unknown option {', '.join(others)}; the only option is {DISCOVERY_OPTION}"
        )
    value = options.get(DISCOVERY_OPTION, DEFAULT_DISCOVERY_INTERVAL_S)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigError(
            f"{where}: options.{DISCOVERY_OPTION} must be a number of seconds >= 0 "
            f"(0 turns replica discovery off), got {value!r}"
        )
    return float(value)


def load_nvml(where: str) -> Any:
    """The `pynvml` module of nvidia-ml-py; ConfigError naming `where` when it is missing."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        raise ConfigError(
            f"{where}: needs NVIDIA's NVML bindings: pip install nvidia-ml-py "
            "(not the deprecated `pynvml` distribution)"
        ) from None


def nvml_states(reading: NvmlReading, node: str, now: float) -> dict[GpuKey, GpuState]:
    """One GpuState per GPU and MIG instance of a reading."""
    states = {}
    for device in reading.devices:
        state = device_state(device, node, now)
        states[state.key] = state
    return states


class NvmlAdapter:
    """Reads the node's GPUs every `poll_interval_s` and yields a delta per changed GPU."""

    def __init__(
        self,
        context: AdapterContext,
        *,
        nvml: Any = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        where = f"gpus {context.name!r} (kind nvml)"
        self.replica_discovery_interval_s = discovery_interval(context.options, where)
        if context.url:
            raise ConfigError(
                f"{where}: reads the local GPUs and takes no url, got {context.url!r}"
            )
        self.node = context.node
        self.poll_interval_s = context.poll_interval_s
        self._reader = NvmlReader(nvml if nvml is not None else load_nvml(where))
        try:
            self._reader.start()
        except NvmlUnavailableError as exc:
            raise ConfigError(f"{where}: NVML is not usable on this machine: {exc}") from None
        if self._reader.xid_problem:
            log.warning("XIDs are not watched", reason=self._reader.xid_problem)
        self._clock = clock
        self._tracker = GpuTracker(first_version=int(clock() * 1000))
        self._problem = ""
        self._lost: tuple[str, ...] = ()
        self._unlisted: dict[str, str] = {}
        self._skipped: set[str] = set()
        self._closed = False

    @classmethod
    def from_context(cls, context: AdapterContext) -> NvmlAdapter:
        """The factory registered for `[[gpus]] kind = "nvml"`."""
        return cls(context)

    @property
    def states(self) -> Mapping[GpuKey, GpuState]:
        return self._tracker.states

    @property
    def problem(self) -> str:
        """Why the last read gave nothing ("" after a good one)."""
        return self._problem

    async def deltas(self) -> AsyncIterator[GpuStateDelta]:
        """Read until cancelled; yields only what changed (`last_updated` included)."""
        while True:
            started = anyio.current_time()
            for delta in await self.poll_once():
                yield delta
            await anyio.sleep(max(0.0, started + self.poll_interval_s - anyio.current_time()))

    async def poll_once(self) -> list[GpuStateDelta]:
        """One read in a worker thread: the deltas it produced."""
        now = self._clock()
        try:
            reading = await asyncio.to_thread(self._reader.read)
        except NvmlUnavailableError as exc:
            self._report(str(exc))
            return []
        self._report("")
        self._report_lost(reading.lost)
        return self._tracker.commit(nvml_states(reading, self.node, now))

    async def replica_gpus(self, urls: Sequence[str]) -> dict[str, ReplicaGpus]:
        """Which GPUs each local runtime at `urls` runs on (NVML and /proc, in a worker thread);
        never raises: a runtime that cannot be mapped gets the reason."""
        try:
            discovery = await asyncio.to_thread(self._discover, tuple(urls))
        except NvmlUnavailableError as exc:
            why = f"NVML cannot list the GPUs' processes: {exc}"
            return {url: ReplicaGpus(reason=why) for url in urls}
        for line in discovery.skipped:
            if line not in self._skipped:
                self._skipped.add(line)
                log.warning("skipped a line of the socket table", line=line)
        return discovery.replicas

    def _discover(self, urls: tuple[str, ...]) -> Discovery:
        processes = self._reader.running_processes()
        for gpu, why in processes.unlisted.items():
            if self._unlisted.get(gpu) != why:  # normal (NotSupported, NoPermission): say once
                log.info("NVML does not list this GPU's processes", gpu=gpu, reason=why)
        self._unlisted = dict(processes.unlisted)
        return discover_replica_gpus(urls, processes.processes, processes.unlisted)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._reader.close)

    def _report(self, problem: str) -> None:
        if problem and problem != self._problem:
            log.error("NVML read failed; GPUs keep their last values", reason=problem)
        elif self._problem and not problem:
            log.info("NVML readable again")
        self._problem = problem

    def _report_lost(self, lost: tuple[str, ...]) -> None:
        for gpu in lost:
            if gpu not in self._lost:
                log.error("GPU lost: NVML cannot read it; its state turns stale", gpu=gpu)
        self._lost = lost

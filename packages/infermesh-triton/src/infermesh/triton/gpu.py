"""GPU telemetry from Triton's own metrics port: the `triton` kind of `[[gpus]]`.

Triton collects utilisation, memory and power of its GPUs through DCGM and exposes them as
`nv_gpu_*`; for a node without dcgm-exporter or NVML access this is its GPU view. `gpu_states`
is the pure mapping (sans-I/O); `TritonGpuAdapter` is the thin polling shell and never raises
out of `deltas()`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuKey, GpuState, GpuStateDelta, Labels
from infermesh.triton.metrics import MetricsReading, TritonPageError, read_metrics

__all__ = ["TritonGpuAdapter", "gpu_states"]

log = get_logger("infermesh.triton.gpu")

METRICS_ACCEPT = "text/plain;version=0.0.4"


def gpu_states(reading: MetricsReading, node: str, now: float) -> dict[GpuKey, GpuState]:
    """One GpuState per GPU on the page; gauges the page lacks keep GpuState's defaults."""
    states = {}
    for uuid, gpu in reading.gpus.items():
        key = GpuKey(node=node, gpu_uuid=uuid)
        states[key] = GpuState(
            key=key,
            labels=Labels(node=node, gpu_uuid=uuid, runtime="triton"),
            utilization=min(1.0, max(0.0, gpu.utilization or 0.0)),
            memory_used_bytes=int(gpu.memory_used_bytes or 0),
            memory_total_bytes=int(gpu.memory_total_bytes or 0),
            power_w=gpu.power_w or 0.0,
            power_limit_w=gpu.power_limit_w or 0.0,
            last_updated=now,
        )
    return states


def _metrics_url(url: str, where: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: url {url!r} must be Triton's metrics URL, e.g. http://127.0.0.1:8002/metrics"
        )
    return url.strip() if parts.path not in ("", "/") else url.strip().rstrip("/") + "/metrics"


class TritonGpuAdapter:
    """Polls one Triton metrics endpoint and streams a GpuStateDelta per changed GPU.

    Use it only where no other GPU adapter (dcgm, nvml) watches the same GPUs: two sources of one
    GPU would overwrite each other. Triton reports no temperature, clock events, XID or ECC, so
    those fields stay at their defaults.
    """

    def __init__(self, context: AdapterContext, *, clock: Callable[[], float] = time.time) -> None:
        where = f"gpus {context.name or context.url!r} (kind triton)"
        if context.options:
            raise ConfigError(
                f"{where}: takes no options, got {', '.join(sorted(context.options))}"
            )
        self.url = _metrics_url(context.url, where)
        self.node = context.node
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        self._clock = clock
        self._version = int(clock() * 1000)
        self._states: dict[GpuKey, GpuState] = {}
        self._problem = ""
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_context(cls, context: AdapterContext) -> TritonGpuAdapter:
        """The factory registered for `[[gpus]] kind = "triton"`."""
        return cls(context)

    @property
    def states(self) -> Mapping[GpuKey, GpuState]:
        return dict(self._states)

    async def deltas(self) -> AsyncIterator[GpuStateDelta]:
        """Poll every `poll_interval_s` until cancelled; yields only what changed."""
        while True:
            started = anyio.current_time()
            now = self._clock()
            text, problem = await self._fetch()
            reading = None
            if text is not None:
                try:
                    reading = read_metrics(text, now, self.url)
                except TritonPageError as exc:
                    problem = f"cannot read {self.url}: {exc}"
            self._report(problem)
            if reading is not None:
                for delta in self._commit(gpu_states(reading, self.node, now)):
                    yield delta
            await anyio.sleep(max(0.0, started + self.poll_interval_s - anyio.current_time()))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self) -> tuple[str | None, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.get(
                self.url,
                headers={"Accept": METRICS_ACCEPT},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                body = await response.read()
                if response.status != 200:
                    return None, f"{self.url} returned HTTP {response.status}"
                return body.decode("utf-8", errors="replace"), ""
        except TimeoutError:
            return None, f"no answer from {self.url} within timeout_s={self.timeout_s:g}"
        except aiohttp.ClientError as exc:
            return None, f"cannot fetch {self.url} ({exc}); is Triton's metrics port reachable?"

    def _report(self, problem: str) -> None:
        # A GPU whose source is down keeps its last values and turns stale (last_updated stays).
        if problem and not self._problem:
            log.error("Triton GPU metrics not readable", url=self.url, reason=problem)
        elif self._problem and not problem:
            log.info("Triton GPU metrics readable again", url=self.url)
        self._problem = problem

    def _commit(self, new_states: Mapping[GpuKey, GpuState]) -> list[GpuStateDelta]:
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

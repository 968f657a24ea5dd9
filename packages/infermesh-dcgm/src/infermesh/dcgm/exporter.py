"""The `dcgm` kind of `[[gpus]]`: polls NVIDIA dcgm-exporter and streams GpuStateDeltas.

A thin aiohttp shell around `exporter_page` (parsing) and `tracker` (versions and deltas).
`deltas()` never raises: an exporter that is down, answers an error or serves a page that is
not a dcgm-exporter exposition is logged once (and again when it recovers), and its GPUs keep
their last values while their `last_updated` ages. An unreachable exporter is not evidence of
broken GPUs, so nothing is marked unhealthy; the scorers' staleness rule decides how long old
telemetry still counts.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
import anyio

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuKey, GpuState, GpuStateDelta
from infermesh.dcgm.exporter_page import ExporterPageError, gpu_states, read_exporter_page
from infermesh.dcgm.tracker import GpuTracker

__all__ = ["DEFAULT_URL", "DcgmExporterAdapter", "exporter_metrics_url"]

log = get_logger("infermesh.dcgm.exporter")

DEFAULT_URL = "http://127.0.0.1:9400/metrics"
METRICS_ACCEPT = "text/plain;version=0.0.4"


def exporter_metrics_url(url: str, where: str) -> str:
    """The /metrics URL of `url` (empty: the exporter's default on this host)."""
    text = url.strip()
    if not text:
        return DEFAULT_URL
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}: url {url!r} must be dcgm-exporter's metrics URL, e.g. {DEFAULT_URL}"
        )
    return text if parts.path not in ("", "/") else text.rstrip("/") + "/metrics"


class DcgmExporterAdapter:
    """Polls one dcgm-exporter every `poll_interval_s` and yields a delta per changed GPU."""

    def __init__(self, context: AdapterContext, *, clock: Callable[[], float] = time.time) -> None:
        where = f"gpus {context.name or context.url!r} (kind dcgm)"
        if context.options:
            raise ConfigError(
                f"{where}: takes no options, got {', '.join(sorted(context.options))}"
            )
        self.url = exporter_metrics_url(context.url, where)
        self.node = context.node
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        self._clock = clock
        self._tracker = GpuTracker(first_version=int(clock() * 1000))
        self._problem = ""
        self._hostnames_seen: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_context(cls, context: AdapterContext) -> DcgmExporterAdapter:
        """The factory registered for `[[gpus]] kind = "dcgm"`."""
        return cls(context)

    @property
    def states(self) -> Mapping[GpuKey, GpuState]:
        return self._tracker.states

    @property
    def problem(self) -> str:
        """Why the last scrape gave nothing ("" after a good one)."""
        return self._problem

    async def deltas(self) -> AsyncIterator[GpuStateDelta]:
        """Poll until cancelled; yields only what changed (`last_updated` included)."""
        while True:
            started = anyio.current_time()
            for delta in await self.poll_once():
                yield delta
            await anyio.sleep(max(0.0, started + self.poll_interval_s - anyio.current_time()))

    async def poll_once(self) -> list[GpuStateDelta]:
        """One scrape: the deltas it produced (none when the exporter could not be read)."""
        now = self._clock()
        text, problem = await self._fetch()
        states = None
        if text is not None:
            try:
                reading = read_exporter_page(text)
                states = gpu_states(reading, self.node, now)
            except ExporterPageError as exc:
                problem = f"cannot read {self.url}: {exc}"
        self._report(problem)
        if states is None:
            return []
        self._note_hostnames(states)
        return self._tracker.commit(states)

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
            return None, f"cannot fetch {self.url} ({exc}); is dcgm-exporter running?"

    def _report(self, problem: str) -> None:
        if problem and problem != self._problem:
            log.error(
                "dcgm-exporter not readable; its GPUs keep their last values and turn stale",
                url=self.url,
                reason=problem,
            )
        elif self._problem and not problem:
            log.info("dcgm-exporter readable again", url=self.url)
        self._problem = problem

    def _note_hostnames(self, states: Mapping[GpuKey, GpuState]) -> None:
        for state in states.values():
            hostname = state.labels.get("hostname") or ""
            if hostname and hostname != self.node and hostname not in self._hostnames_seen:
                self._hostnames_seen.add(hostname)
                log.info(
                    "dcgm-exporter reports another hostname than this node's id; GPUs are "
                    "keyed by the node id, the exporter's hostname is kept as a label",
                    url=self.url,
                    hostname=hostname,
                    node=self.node,
                )

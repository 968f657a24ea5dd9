"""The Triton runtime adapter: polls the metrics port, the repository index and /v2/health/ready.

A thin aiohttp shell around TargetTracker that streams ModelStateDeltas and implements
RuntimeControl through Triton's repository API. It never raises out of `deltas()`: a server that
is down or a page it cannot read becomes unhealthy targets and one logged error (and one line
again on recovery).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import attrs

from infermesh.core.config import ConfigError, runtime_base_url
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.core.target_transport import KSERVE_GRPC_LABEL, KSERVE_TRANSPORT, TRANSPORT_LABEL
from infermesh.triton.control import load_model, unload_model, warm_model
from infermesh.triton.metrics import MetricsReading
from infermesh.triton.parse import Estimate
from infermesh.triton.tracker import (
    FetchFailed,
    Observation,
    PageFetched,
    ScrapeOutcome,
    TargetTracker,
)

__all__ = ["METRICS_ACCEPT", "TritonAdapter", "TritonOptions", "base_url_of", "metrics_url_of"]

log = get_logger("infermesh.triton")

METRICS_ACCEPT = "text/plain;version=0.0.4"
DEFAULT_METRICS_PORT = 8002
# A page costs roughly 25-75 µs a line to read (measured on a loaded 2-core machine): ~10 model
# versions (13 kB) take a few ms, 100 versions (110 kB) tens of ms. Pages past this size are read
# in a worker thread so the event loop keeps turning.
THREAD_PARSE_CHARS = 64 * 1024


def base_url_of(url: str, where: str) -> str:
    """The KServe HTTP base URL (no trailing `/` or `/v2`), as targets and the router use it."""
    return runtime_base_url(url, where, api_suffix="/v2")


def metrics_url_of(base_url: str) -> str:
    """Triton's default metrics URL for a server: same host, port 8002, path /metrics."""
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"


@attrs.frozen
class TritonOptions:
    """The Triton-specific keys of a `[[runtimes]]` table's `options`."""

    metrics_url: str = ""
    """Triton's metrics endpoint; empty: the url's host, port 8002, path /metrics."""
    grpc_url: str = ""
    """Triton's gRPC `host:port` (optional); published on targets as label `kserve_grpc`."""
    control_timeout_s: float = 300.0
    """Limit for load / unload / warm calls (loading a model can take minutes)."""
    warmup: Mapping[str, Any] = attrs.field(factory=dict)
    """Model name -> KServe v2 infer request (a table, or a JSON string) that `warm` sends;
    models not listed are warmed with zeros built from their metadata."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], where: str) -> TritonOptions:
        known = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; "
                f"expected any of: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name in ("metrics_url", "grpc_url"):
            if name in options:
                value = options[name]
                if not isinstance(value, str):
                    raise ConfigError(
                        f"{where}: options.{name} must be a string, got {type(value).__name__}"
                    )
                values[name] = value.strip()
        if values.get("metrics_url") and not values["metrics_url"].startswith(
            ("http://", "https://")
        ):
            raise ConfigError(
                f"{where}: options.metrics_url {values['metrics_url']!r} must be an http:// or "
                "https:// URL, e.g. http://127.0.0.1:8002/metrics"
            )
        grpc_url = values.get("grpc_url", "")
        if grpc_url:
            target = grpc_url.removeprefix("grpc://")
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(
                    f"{where}: options.grpc_url {grpc_url!r} must be host:port, e.g. 127.0.0.1:8001"
                )
            values["grpc_url"] = target
        if "control_timeout_s" in options:
            timeout = options["control_timeout_s"]
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
                raise ConfigError(f"{where}: options.control_timeout_s must be a number > 0")
            values["control_timeout_s"] = float(timeout)
        if "warmup" in options:
            values["warmup"] = _warmup_requests(options["warmup"], where)
        return cls(**values)


def _warmup_requests(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: options.warmup must be a table of model name -> request")
    requests: dict[str, Any] = {}
    for model, request in value.items():
        if isinstance(request, str):
            try:
                request = json.loads(request)
            except ValueError as exc:
                raise ConfigError(
                    f"{where}: options.warmup.{model} is not valid JSON ({exc})"
                ) from None
        if not isinstance(request, Mapping) or not isinstance(request.get("inputs"), list):
            raise ConfigError(
                f"{where}: options.warmup.{model} must be a KServe v2 infer request with an "
                '"inputs" list'
            )
        requests[str(model)] = dict(request)
    return requests


class TritonAdapter:
    """Watches one Triton server and controls its model repository.

    Implements both RuntimeAdapter (`deltas`, `aclose`) and RuntimeControl (`load`, `unload`,
    `warm`). Targets are keyed by the server's KServe HTTP base URL, one per model.
    """

    def __init__(self, context: AdapterContext, *, clock: Callable[[], float] = time.time) -> None:
        where = f"runtime {context.name or context.url!r} (kind triton)"
        self.options = TritonOptions.from_mapping(context.options, where)
        self.base_url = base_url_of(context.url, where)
        self.metrics_url = self.options.metrics_url or metrics_url_of(self.base_url)
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        self._clock = clock
        # How the router reaches these targets travels with them (gossip, State, ScoreTargets),
        # so a router on another node needs no [[runtimes]] table for this Triton.
        custom = {TRANSPORT_LABEL: KSERVE_TRANSPORT}
        if self.options.grpc_url:
            custom[KSERVE_GRPC_LABEL] = self.options.grpc_url
        # Versions seeded from the clock keep growing across agent restarts.
        self._tracker = TargetTracker(
            node=context.node,
            endpoint=self.base_url,
            metrics_url=self.metrics_url,
            index_url=self.base_url + "/v2/repository/index",
            custom_labels=custom,
            first_version=int(clock() * 1000),
        )
        self._session: aiohttp.ClientSession | None = None
        self._wake: anyio.Event | None = None
        self.polls = 0
        """Scrapes done so far (successful or not)."""

    @classmethod
    def from_context(cls, context: AdapterContext) -> TritonAdapter:
        """The factory registered for kind `triton`."""
        return cls(context)

    @property
    def states(self) -> Mapping[TargetKey, ModelState]:
        """The latest state of every model seen so far."""
        return self._tracker.states

    @property
    def estimates(self) -> Mapping[tuple[str, str], Estimate]:
        """Per (model, version): service rate and latencies over the last poll interval."""
        return self._tracker.estimates

    @property
    def reading(self) -> MetricsReading | None:
        """The last metrics page read, GPU utilisation and memory included."""
        return self._tracker.reading

    # ------------------------------------------------------------------ RuntimeAdapter

    async def deltas(self) -> AsyncIterator[ModelStateDelta]:
        """Poll every `poll_interval_s` until cancelled; yields only what changed."""
        while True:
            started = anyio.current_time()
            now = self._clock()  # stamped when the fetch starts, as Prometheus does
            outcome = await self._scrape()
            self.polls += 1
            if isinstance(outcome, PageFetched) and len(outcome.metrics_text) > THREAD_PARSE_CHARS:
                observation = await anyio.to_thread.run_sync(self._tracker.observe, outcome, now)
            else:
                observation = self._tracker.observe(outcome, now)
            self._log(observation)
            for delta in observation.deltas:
                yield delta
            await self._pause_until(started + self.poll_interval_s)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ RuntimeControl

    async def load(self, model: str, source: str) -> None:
        """Load `model` from Triton's repository (`source` empty or `repository`), or with the
        JSON model configuration `source` (Triton's `parameters.config`)."""
        timeout_s = self.options.control_timeout_s
        await load_model(self._ensure_session(), self.base_url, model, source, timeout_s)
        self._poll_now()

    async def unload(self, model: str) -> None:
        timeout_s = self.options.control_timeout_s
        await unload_model(self._ensure_session(), self.base_url, model, timeout_s)
        self._poll_now()

    async def warm(self, model: str) -> None:
        """One inference: `options.warmup[model]`, or zeros built from the model's metadata."""
        request = self.options.warmup.get(model)
        timeout_s = self.options.control_timeout_s
        await warm_model(self._ensure_session(), self.base_url, model, request, timeout_s)

    # ------------------------------------------------------------------ internals

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8))
        return self._session

    def _poll_now(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _pause_until(self, deadline: float) -> None:
        self._wake = wake = anyio.Event()
        with anyio.move_on_after(max(0.0, deadline - anyio.current_time())):
            await wake.wait()
        self._wake = None

    async def _scrape(self) -> ScrapeOutcome:
        try:
            return await self._fetch_all()
        except Exception as exc:  # never let a surprise end the stream; report it instead
            return FetchFailed(f"unexpected error scraping {self.base_url}: {exc!r}")

    async def _fetch_all(self) -> ScrapeOutcome:
        session = self._ensure_session()
        index_url = self.base_url + "/v2/repository/index"
        ready_url = self.base_url + "/v2/health/ready"
        answers: dict[str, tuple[int, bytes] | str] = {}

        async def fetch(url: str, method: str, headers: Mapping[str, str], body: bytes) -> None:
            answers[url] = await self._request(session, method, url, headers, body)

        async with anyio.create_task_group() as group:
            group.start_soon(fetch, self.metrics_url, "GET", {"Accept": METRICS_ACCEPT}, b"")
            group.start_soon(fetch, index_url, "POST", {"Content-Type": "application/json"}, b"{}")
            group.start_soon(fetch, ready_url, "GET", {}, b"")
        fetched: dict[str, tuple[int, bytes]] = {}
        for url in (self.metrics_url, index_url, ready_url):
            answer = answers[url]
            if isinstance(answer, str):
                return FetchFailed(answer)
            if url != ready_url and answer[0] != 200:
                return FetchFailed(self._status_reason(url, *answer))
            fetched[url] = answer
        return PageFetched(
            metrics_text=fetched[self.metrics_url][1].decode("utf-8", errors="replace"),
            index_json=fetched[index_url][1],
            ready_status=fetched[ready_url][0],
        )

    async def _request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, bytes] | str:
        """(status, body), or why the URL could not be fetched."""
        try:
            async with session.request(
                method,
                url,
                headers=headers,
                data=body or None,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            return (
                f"no answer from {url} within timeout_s={self.timeout_s:g}; is Triton overloaded?"
            )
        except aiohttp.ClientConnectionError as exc:
            hint = (
                "is Triton started with --allow-metrics and is options.metrics_url right?"
                if url == self.metrics_url
                else "is the Triton server running at that URL?"
            )
            return f"cannot connect to {url} ({exc}); {hint}"
        except aiohttp.ClientError as exc:
            return f"{method} {url} failed: {exc}"

    def _status_reason(self, url: str, status: int, body: bytes) -> str:
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        hint = ""
        if status == 404:
            hint = (
                "; is options.metrics_url Triton's metrics endpoint (port 8002, /metrics)?"
                if url == self.metrics_url
                else "; is the runtime URL Triton's HTTP endpoint (port 8000)?"
            )
        return f"{url} returned HTTP {status} {excerpt!r}{hint}"

    def _log(self, observation: Observation) -> None:
        if observation.problem_started:
            log.error(
                "Triton server not usable; its models will not be routed to",
                url=self.base_url,
                reason=observation.problem_started,
            )
        if observation.recovered:
            log.info("Triton server usable again", url=self.base_url)

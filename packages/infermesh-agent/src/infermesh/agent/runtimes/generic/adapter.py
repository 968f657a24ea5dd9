"""The mapped runtime adapter: polls a runtime's metrics, model list and health, streams deltas.

A thin aiohttp shell around GenericTracker, driven by a MetricMapping (shipped for TGI, SGLang,
TorchServe, TF Serving and OVMS, or the operator's file for kind `generic`). It never raises out
of `deltas()`: a runtime that is down or a page it cannot read becomes unhealthy targets and one
logged error (and one line again on recovery).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import anyio
import attrs

from infermesh.agent.runtimes.generic.mapping import (
    MappingError,
    MetricMapping,
    load_mapping_file,
    shipped_mapping,
)
from infermesh.agent.runtimes.generic.tracker import (
    FetchFailed,
    GenericTracker,
    Observation,
    PageFetched,
    ScrapeOutcome,
)
from infermesh.core.config import ConfigError, runtime_base_url
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey

__all__ = ["METRICS_ACCEPT", "GenericAdapter", "GenericOptions"]

log = get_logger("infermesh.agent.runtimes.generic")

# The classic text format: a server that negotiates OpenMetrics may escape `ns:` names.
METRICS_ACCEPT = "text/plain;version=0.0.4"
THREAD_PARSE_CHARS = 512 * 1024


@attrs.frozen
class GenericOptions:
    """The keys of a mapped runtime's `[[runtimes]]` table `options`."""

    mapping: str = ""
    """Path to a mapping TOML; required for kind `generic`, refused for the shipped kinds."""
    models: tuple[str, ...] = ()
    """Model names the server serves; replaces the mapping's model source when set."""
    metrics_url: str = ""
    """Full URL of the metrics page, when not the mapping's path on the runtime's URL."""
    models_url: str = ""
    health_url: str = ""
    """Full URL of the health check; may hold `{model}` like the mapping's health path."""
    api_key: str = ""
    api_key_env: str = ""
    max_num_seqs: int | None = None
    """The server's concurrency limit, when its metrics do not say."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], where: str) -> GenericOptions:
        known = {field.name for field in attrs.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; "
                f"expected any of: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for name, value in options.items():
            if name == "models":
                if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"{where}: options.models must be a list of model names")
                values[name] = tuple(value)
            elif name == "max_num_seqs":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ConfigError(f"{where}: options.max_num_seqs must be an integer >= 1")
                values[name] = value
            elif isinstance(value, str):
                values[name] = value
            else:
                raise ConfigError(
                    f"{where}: options.{name} must be a string, got {type(value).__name__}"
                )
        return cls(**values)


def _url_of(base: str, path: str, port: int | None) -> str:
    if port is None:
        return base + path
    parts = urlsplit(base)
    host = parts.hostname or ""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + path, "", ""))


class GenericAdapter:
    """Watches one runtime through a metric mapping (RuntimeAdapter: `deltas`, `aclose`).

    Targets are keyed by the runtime's base URL, one per model it serves.
    """

    def __init__(
        self,
        context: AdapterContext,
        kind: str,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        where = f"runtime {context.name or context.url!r} (kind {kind})"
        self.options = options = GenericOptions.from_mapping(context.options, where)
        self.mapping = self._mapping(kind, options, where)
        self.base_url = runtime_base_url(context.url, where)
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        mapping = self.mapping
        if mapping.models_source == "config" and not options.models:
            raise ConfigError(
                f"{where}: {mapping.title} has no model list to read; set options.models"
            )
        if mapping.health_check == "model_status" and not options.models:
            raise ConfigError(
                f"{where}: {mapping.title} health is checked per model; set options.models"
            )
        self.metrics_url = options.metrics_url or _url_of(
            self.base_url, mapping.metrics_path, mapping.metrics_port
        )
        self.models_url = ""
        if not options.models and mapping.models_source not in ("config", "metrics"):
            self.models_url = options.models_url or _url_of(
                self.base_url, mapping.models_path, mapping.models_port
            )
        self.health_url = options.health_url or self.base_url + mapping.health_path
        token = self._token(options, os.environ if environ is None else environ, where)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._clock = clock
        self._tracker = GenericTracker(
            mapping=mapping,
            node=context.node,
            endpoint=self.base_url,
            models=options.models,
            max_num_seqs=options.max_num_seqs,
            first_version=int(clock() * 1000),
        )
        self._session: aiohttp.ClientSession | None = None
        self.polls = 0
        """Scrapes done so far (successful or not)."""

    @staticmethod
    def _mapping(kind: str, options: GenericOptions, where: str) -> MetricMapping:
        try:
            if kind == "generic":
                if not options.mapping:
                    raise ConfigError(f"{where}: kind generic needs options.mapping (a TOML path)")
                return load_mapping_file(options.mapping)
            if options.mapping:
                raise ConfigError(
                    f"{where}: options.mapping is for kind generic; kind {kind} uses its "
                    "shipped mapping (copy it and use kind generic to change it)"
                )
            return shipped_mapping(kind)
        except MappingError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    @staticmethod
    def _token(options: GenericOptions, environ: Mapping[str, str], where: str) -> str:
        if options.api_key_env:
            token = environ.get(options.api_key_env, "")
            if not token:
                raise ConfigError(f"{where}: environment variable {options.api_key_env} is not set")
            return token
        return options.api_key

    @property
    def states(self) -> Mapping[TargetKey, ModelState]:
        """The latest state of every target seen so far."""
        return self._tracker.states

    async def deltas(self) -> AsyncIterator[ModelStateDelta]:
        """Poll every `poll_interval_s` until cancelled; yields only what changed."""
        while True:
            started = anyio.current_time()
            now = self._clock()
            outcome = await self._scrape()
            self.polls += 1
            if isinstance(outcome, PageFetched) and len(outcome.metrics_text) > THREAD_PARSE_CHARS:
                observation = await anyio.to_thread.run_sync(self._tracker.observe, outcome, now)
            else:
                observation = self._tracker.observe(outcome, now)
            self._log(observation)
            for delta in observation.deltas:
                yield delta
            await anyio.sleep(max(0.0, started + self.poll_interval_s - anyio.current_time()))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ internals

    async def _scrape(self) -> ScrapeOutcome:
        try:
            return await self._fetch_all()
        except Exception as exc:  # never let a surprise end the stream; report it instead
            return FetchFailed(f"unexpected error scraping {self.base_url}: {exc!r}")

    async def _fetch_all(self) -> ScrapeOutcome:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._auth, connector=aiohttp.TCPConnector(limit=8)
            )
        session = self._session
        health_urls = {"": self.health_url}
        if self.mapping.health_check == "model_status":
            template = self.health_url
            health_urls = {
                m: template.replace("{model}", quote(m, safe="")) for m in self.options.models
            }
        answers: dict[str, tuple[int, bytes] | str] = {}

        async def fetch(name: str, url: str, accept: str) -> None:
            answers[name] = await self._get(session, url, accept)

        async with anyio.create_task_group() as group:
            group.start_soon(fetch, "metrics", self.metrics_url, METRICS_ACCEPT)
            if self.models_url:
                group.start_soon(fetch, "models", self.models_url, "application/json")
            for model, url in health_urls.items():
                group.start_soon(fetch, "health:" + model, url, "application/json")
        fetched: dict[str, tuple[int, bytes]] = {}
        for name, answer in answers.items():
            if isinstance(answer, str):
                return FetchFailed(answer)
            fetched[name] = answer
        for name, url in (("metrics", self.metrics_url), ("models", self.models_url)):
            status_body = fetched.get(name)
            if status_body is not None and status_body[0] != 200:
                return FetchFailed(self._status_reason(url, *status_body))
        models = fetched.get("models")
        return PageFetched(
            metrics_text=fetched["metrics"][1].decode("utf-8", errors="replace"),
            models_body=models[1] if models is not None else None,
            health={model: fetched["health:" + model] for model in health_urls},
        )

    async def _get(
        self, session: aiohttp.ClientSession, url: str, accept: str
    ) -> tuple[int, bytes] | str:
        """(status, body), or why the URL could not be fetched."""
        title = self.mapping.title
        try:
            async with session.get(
                url,
                headers={"Accept": accept},
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            limit = f"timeout_s={self.timeout_s:g}"
            return f"no answer from {url} within {limit}; is {title} overloaded?"
        except aiohttp.ClientConnectionError as exc:
            return f"cannot connect to {url} ({exc}); is the {title} server running at that URL?"
        except aiohttp.ClientError as exc:
            return f"GET {url} failed: {exc}"

    def _status_reason(self, url: str, status: int, body: bytes) -> str:
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        hint = ""
        if status in (401, 403):
            hint = "; set the runtime's options.api_key or options.api_key_env"
        elif status == 404:
            hint = f"; are {self.mapping.title}'s metrics enabled, and is the URL right?"
        return f"GET {url} returned HTTP {status} {excerpt!r}{hint}"

    def _log(self, observation: Observation) -> None:
        title = self.mapping.title
        if observation.problem_started:
            log.error(
                f"{title} runtime not usable; its models will not be routed to",
                url=self.base_url,
                reason=observation.problem_started,
            )
        if observation.recovered:
            log.info(f"{title} runtime usable again", url=self.base_url)

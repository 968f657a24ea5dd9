"""The vLLM runtime adapter: polls /metrics, /v1/models and /health and streams ModelStateDeltas.

A thin aiohttp shell around TargetTracker; it also implements RuntimeControl. It never raises
out of `deltas()`: a runtime that is down or a page it cannot read becomes unhealthy targets and
one logged error (and one line again on recovery).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import anyio
import attrs

from infermesh.core.config import ConfigError, runtime_base_url
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.vllm.control import load_lora_adapter, unload_lora_adapter, warm_model
from infermesh.vllm.tracker import (
    FetchFailed,
    Observation,
    PageFetched,
    ScrapeOutcome,
    TargetTracker,
)

__all__ = ["METRICS_ACCEPT", "VllmAdapter", "VllmOptions", "base_url_of"]

log = get_logger("infermesh.vllm")

# vLLM answers /metrics in the classic text format; asking for it keeps a future server from
# negotiating OpenMetrics with escaped (`vllm_`) names.
METRICS_ACCEPT = "text/plain;version=0.0.4"
# A typical page (~30 kB) parses in well under a millisecond on the loop; a page this large
# (many engines or adapters) is parsed in a worker thread so the loop never stalls.
THREAD_PARSE_CHARS = 512 * 1024


@attrs.frozen
class VllmOptions:
    """The vLLM-specific keys of a `[[runtimes]]` table's `options`."""

    api_key: str = ""
    """Bearer token for a server started with `--api-key` (protects /v1/*)."""
    api_key_env: str = ""
    """Name of an environment variable holding the token instead."""
    control_timeout_s: float = 300.0
    """Limit for load / unload / warm calls (loading an adapter can take a while)."""
    warm_prompt: str = "Hello"

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any], where: str) -> VllmOptions:
        known = {field.name: field for field in attrs.fields(cls)}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; "
                f"expected any of: {', '.join(known)}"
            )
        values: dict[str, Any] = {}
        for name, value in options.items():
            expected = known[name].type
            if (
                expected == "float"
                and isinstance(value, int | float)
                and not isinstance(value, bool)
            ):
                if value <= 0:
                    raise ConfigError(f"{where}: options.{name} must be > 0, got {value!r}")
                values[name] = float(value)
            elif expected == "str" and isinstance(value, str):
                values[name] = value
            else:
                raise ConfigError(
                    f"{where}: options.{name} must be a {expected}, got {type(value).__name__}"
                )
        return cls(**values)

    def bearer_token(self, environ: Mapping[str, str], where: str) -> str:
        if self.api_key_env:
            token = environ.get(self.api_key_env, "")
            if not token:
                raise ConfigError(f"{where}: environment variable {self.api_key_env} is not set")
            return token
        return self.api_key


def base_url_of(url: str, where: str) -> str:
    """The server's base URL (no trailing `/` or `/v1`), as targets and the router use it."""
    return runtime_base_url(url, where, api_suffix="/v1")


class VllmAdapter:
    """Watches one vLLM OpenAI-compatible server and controls it.

    Implements both RuntimeAdapter (`deltas`, `aclose`) and RuntimeControl (`load`, `unload`,
    `warm`). Targets are keyed by the server's base URL.
    """

    def __init__(
        self,
        context: AdapterContext,
        *,
        clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        where = f"runtime {context.name or context.url!r} (kind vllm)"
        self.options = VllmOptions.from_mapping(context.options, where)
        self.base_url = base_url_of(context.url, where)
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        token = self.options.bearer_token(os.environ if environ is None else environ, where)
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        self._clock = clock
        # Versions seeded from the clock keep growing across agent restarts.
        self._tracker = TargetTracker(
            node=context.node, endpoint=self.base_url, first_version=int(clock() * 1000)
        )
        self._session: aiohttp.ClientSession | None = None
        self._wake: anyio.Event | None = None
        self.polls = 0
        """Scrapes done so far (successful or not)."""

    @classmethod
    def from_context(cls, context: AdapterContext) -> VllmAdapter:
        """The factory registered for kind `vllm`."""
        return cls(context)

    @property
    def states(self) -> Mapping[TargetKey, ModelState]:
        """The latest state of every target seen so far."""
        return self._tracker.states

    # ------------------------------------------------------------------ RuntimeAdapter

    async def deltas(self) -> AsyncIterator[ModelStateDelta]:
        """Poll every `poll_interval_s` until cancelled; yields only what changed."""
        while True:
            started = anyio.current_time()
            # Stamp the telemetry when the fetch starts (as Prometheus does): a request sent
            # after this instant may or may not be in the page, so it counts as in flight.
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
            await self._pause_until(started + self.poll_interval_s)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ RuntimeControl

    async def load(self, model: str, source: str) -> None:
        """Load LoRA adapter `model` from `source` (a path or Hugging Face id vLLM can read)."""
        timeout_s = self.options.control_timeout_s
        await load_lora_adapter(self._ensure_session(), self.base_url, model, source, timeout_s)
        self._poll_now()

    async def unload(self, model: str) -> None:
        timeout_s = self.options.control_timeout_s
        await unload_lora_adapter(self._ensure_session(), self.base_url, model, timeout_s)
        self._poll_now()

    async def warm(self, model: str) -> None:
        prompt, timeout_s = self.options.warm_prompt, self.options.control_timeout_s
        await warm_model(self._ensure_session(), self.base_url, model, prompt, timeout_s)

    # ------------------------------------------------------------------ internals

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._auth, connector=aiohttp.TCPConnector(limit=8)
            )
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
        answers: dict[str, tuple[int, bytes] | str] = {}

        async def fetch(path: str, headers: Mapping[str, str]) -> None:
            answers[path] = await self._get(session, path, headers)

        async with anyio.create_task_group() as group:
            group.start_soon(fetch, "/metrics", {"Accept": METRICS_ACCEPT})
            group.start_soon(fetch, "/v1/models", {"Accept": "application/json"})
            group.start_soon(fetch, "/health", {})
        responses: dict[str, tuple[int, bytes]] = {}
        for path in ("/metrics", "/v1/models", "/health"):
            answer = answers[path]
            if isinstance(answer, str):
                return FetchFailed(answer)
            if path != "/health" and answer[0] != 200:
                return FetchFailed(self._status_reason(path, *answer))
            responses[path] = answer
        return PageFetched(
            metrics_text=responses["/metrics"][1].decode("utf-8", errors="replace"),
            models_json=responses["/v1/models"][1],
            health_status=responses["/health"][0],
        )

    async def _get(
        self, session: aiohttp.ClientSession, path: str, headers: Mapping[str, str]
    ) -> tuple[int, bytes] | str:
        """(status, body), or why the URL could not be fetched."""
        url = self.base_url + path
        try:
            async with session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            return f"no answer from {url} within timeout_s={self.timeout_s:g}; is vLLM overloaded?"
        except aiohttp.ClientConnectionError as exc:
            return f"cannot connect to {url} ({exc}); is the vLLM server running at that URL?"
        except aiohttp.ClientError as exc:
            return f"GET {url} failed: {exc}"

    def _status_reason(self, path: str, status: int, body: bytes) -> str:
        url = self.base_url + path
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        hint = ""
        if status in (401, 403):
            hint = "; set the runtime's options.api_key or options.api_key_env"
        elif status == 404:
            hint = "; is the runtime URL the vLLM server's base URL?"
        return f"GET {url} returned HTTP {status} {excerpt!r}{hint}"

    def _log(self, observation: Observation) -> None:
        if observation.problem_started:
            log.error(
                "vLLM runtime not usable; its models will not be routed to",
                url=self.base_url,
                reason=observation.problem_started,
            )
        if observation.recovered:
            log.info("vLLM runtime usable again", url=self.base_url)

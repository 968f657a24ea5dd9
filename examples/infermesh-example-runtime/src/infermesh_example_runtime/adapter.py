"""The llama-server runtime adapter: polls four pages and streams what changed (kind "llamacpp").

A thin aiohttp shell around `parse.Tracker`. It never raises out of `deltas()`: a server that
is down or answers something unexpected makes its model unhealthy with the reason, logged once
when the problem starts and once when it ends.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import anyio

from infermesh.core.config import ConfigError, runtime_base_url
from infermesh.core.contracts import AdapterContext
from infermesh.core.logging import get_logger
from infermesh.core.model import ModelStateDelta
from infermesh_example_runtime.parse import Page, Poll, Tracker

__all__ = ["OPTIONS", "LlamaCppAdapter"]

log = get_logger("infermesh_example_runtime")

OPTIONS = ("model",)
"""The keys a `[[runtimes]] kind = "llamacpp"` table's `options` may have."""
PAGES = ("/health", "/props", "/slots", "/metrics")


class LlamaCppAdapter:
    """RuntimeAdapter for one llama-server; its target's endpoint is the server's base URL."""

    def __init__(self, context: AdapterContext, *, clock: Callable[[], float] = time.time):
        where = f"runtime {context.name or context.url!r} (kind llamacpp)"
        unknown = sorted(set(context.options) - set(OPTIONS))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option(s) {', '.join(unknown)}; expected any of: "
                f"{', '.join(OPTIONS)}"
            )
        model = context.options.get("model", "")
        if not isinstance(model, str):
            raise ConfigError(f"{where}: options.model must be a str, got {type(model).__name__}")
        self.base_url = runtime_base_url(context.url, where, api_suffix="/v1")
        self.poll_interval_s = context.poll_interval_s
        self.timeout_s = context.timeout_s
        self._clock = clock
        # Versions seeded from the clock keep growing across agent restarts.
        self.tracker = Tracker(context.node, self.base_url, model, int(clock() * 1000))
        self._session: aiohttp.ClientSession | None = None

    async def deltas(self) -> AsyncIterator[ModelStateDelta]:
        """Poll every `poll_interval_s` until cancelled; yields only what changed."""
        while True:
            started = anyio.current_time()
            now = self._clock()
            was = self.tracker.problem
            for delta in self.tracker.observe(await self._poll(), now):
                yield delta
            if self.tracker.problem and not was:
                log.error("llama-server not usable", url=self.base_url, reason=self.tracker.problem)
            elif was and not self.tracker.problem:
                log.info("llama-server usable again", url=self.base_url)
            await anyio.sleep(max(0.0, started + self.poll_interval_s - anyio.current_time()))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _poll(self) -> Poll:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        session = self._session
        pages: dict[str, Page] = {}

        async def fetch(path: str) -> None:
            pages[path] = await self._get(session, path)

        async with anyio.create_task_group() as group:
            for path in PAGES:
                group.start_soon(fetch, path)
        return Poll(self.base_url, *(pages[path] for path in PAGES))

    async def _get(self, session: aiohttp.ClientSession, path: str) -> Page:
        url = self.base_url + path
        try:
            async with session.get(
                url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            ) as response:
                return response.status, await response.read()
        except TimeoutError:
            return f"no answer from {url} within timeout_s={self.timeout_s:g}"
        except aiohttp.ClientConnectionError as exc:
            return f"cannot connect to {url} ({exc}); is llama-server running at that URL?"
        except aiohttp.ClientError as exc:
            return f"GET {url} failed: {exc}"

"""The real-time loop around the engine model: one asyncio task steps it on the wall clock.

Each step is computed at once, then the loop sleeps until the step's end and hands its tokens to
the waiting requests and its statistics to the metrics page. Knows nothing about HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from infermesh.core.logging import get_logger
from infermesh.dev.engine import (
    Engine,
    EngineRequest,
    EngineSnapshot,
    FinishedStats,
    TokenOutput,
)
from infermesh.dev.metrics_page import VllmMetricsPage

__all__ = ["EngineDriver"]


class EngineDriver:
    """Feeds requests to an `Engine` and streams each request's tokens as steps produce them."""

    def __init__(
        self,
        engine: Engine,
        metrics: VllmMetricsPage,
        clock: Callable[[], float] = time.monotonic,
        on_finished: Callable[[FinishedStats], None] | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.clock = clock
        self.on_finished = on_finished
        """Sees each request's stats when it finishes or is aborted (the emulator's log)."""
        self.dead_reason = ""
        self._streams: dict[str, asyncio.Queue[TokenOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="engine-loop")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def healthy(self) -> bool:
        return not self.dead_reason

    def snapshot(self) -> EngineSnapshot:
        return self.engine.snapshot()

    def submit(self, request: EngineRequest) -> asyncio.Queue[TokenOutput]:
        """Queue a request; its outputs (one per generated token) arrive on the returned queue."""
        self.engine.submit(request, self.clock())
        stream: asyncio.Queue[TokenOutput] = asyncio.Queue()
        self._streams[request.request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request whose client went away (a no-op once it has finished)."""
        self._streams.pop(request_id, None)
        finished = self.engine.abort(request_id, self.clock())
        if finished is not None:
            self.metrics.record_finished(finished)
            if self.on_finished is not None:
                self.on_finished(finished)
            self._wake.set()

    async def _run(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                result = self.engine.step(self.clock())
                if not result.outputs and not result.stats.scheduled_tokens:
                    # Nothing fits until a request arrives or one is aborted.
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                delay_s = result.end_s - self.clock()
                await asyncio.sleep(max(delay_s, 0.0))
                self.metrics.record_step(result.stats)
                if self.on_finished is not None:
                    for finished in result.stats.finished:
                        self.on_finished(finished)
                for output in result.outputs:
                    stream = self._streams.get(output.request_id)
                    if stream is None:
                        continue
                    stream.put_nowait(output)
                    if output.finished:
                        del self._streams[output.request_id]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the model must not hang clients forever
            self.dead_reason = f"engine loop failed: {type(exc).__name__}: {exc}"
            get_logger(__name__).exception("engine_loop_failed")
            for stream in self._streams.values():
                stream.put_nowait(
                    TokenOutput(
                        request_id="",
                        num_output_tokens=0,
                        finished=True,
                        finish_reason="error",
                        prompt_tokens=0,
                        cached_tokens=0,
                    )
                )
            self._streams.clear()

"""Keeps a `StateReplica` fed from the agent's State watch streams, reconnecting with backoff.

One background task: opens WatchModelDeltas and WatchGpuDeltas (initial_snapshot=true), lists
what the agent holds so the replica knows when the snapshot is complete, then applies deltas as
they arrive until a stream fails or ends; then waits (100 ms doubling to 2 s) and starts again.
Only moves messages: every decision about the state is the replica's. Never touches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from infermesh.core.convert import (
    gpu_delta_from_pb,
    gpu_key_from_pb,
    model_delta_from_pb,
    target_key_from_pb,
)
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuKey
from infermesh.router.agent_client import AgentClient
from infermesh.router.replica import StateReplica

__all__ = ["StateWatcher"]

log = get_logger(__name__)

BACKOFF_INITIAL_S = 0.1
BACKOFF_MAX_S = 2.0


class StreamEnded(Exception):
    """The agent closed a watch stream (it is shutting down, or dropped a slow watcher)."""


class StateWatcher:
    """The background task between the agent's watch streams and the replica."""

    def __init__(
        self,
        client: AgentClient,
        replica: StateReplica,
        *,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.replica = replica
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.bad_deltas = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="infermesh-router-state-watch"
            )

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        backoff_s = self.backoff_initial_s
        failing = False
        while True:
            syncs_before = self.replica.syncs
            error: Exception = StreamEnded("no stream")
            try:
                await self._session()
            except Exception as exc:  # whatever went wrong, the task must live on and retry
                error = exc
            self.replica.lost(self.clock())
            if self.replica.syncs > syncs_before:
                backoff_s = self.backoff_initial_s  # this connection worked: retry promptly
                failing = False
            if not failing:
                # Once per outage; the replica keeps serving its last state meanwhile.
                log.warning("agent state stream lost; reconnecting", error=_describe(error))
                failing = True
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, self.backoff_max_s)

    async def _session(self) -> None:
        """One connection: snapshot, then live deltas until a stream fails or ends."""
        replica = self.replica
        replica.begin()
        models_call = self.client.watch_model_deltas()
        gpus_call = self.client.watch_gpu_deltas()
        pumps = [
            asyncio.ensure_future(self._pump("WatchModelDeltas", models_call, self._model)),
            asyncio.ensure_future(self._pump("WatchGpuDeltas", gpus_call, self._gpu)),
        ]
        listing = asyncio.ensure_future(self._listing())
        tasks = [listing, *pumps]
        try:
            # A pump only ever ends with an error; the listing ends first unless one did.
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if not listing.done() or listing.exception() is not None:
                _raise_first_error(tasks)
            models, gpus = listing.result()
            if replica.expect(models, gpus):
                self._synced()
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            _raise_first_error(pumps)
        finally:
            for call in (models_call, gpus_call):
                call.cancel()
            for task in tasks:
                task.cancel()
            # Retrieves every task's outcome, so no error goes unretrieved.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _listing(self) -> tuple[dict[str, int], dict[GpuKey, int]]:
        model_states = await self.client.list_model_states()
        gpu_states = await self.client.list_gpu_states()
        models = {target_key_from_pb(s.key).target_id: s.version for s in model_states.states}
        gpus = {gpu_key_from_pb(g.key): g.version for g in gpu_states.states}
        return models, gpus

    async def _pump(self, method: str, call: Any, apply: Callable[[Any], None]) -> None:
        try:
            async for message in call:
                apply(message)
        except grpc.aio.AioRpcError as exc:
            raise self.client.unavailable(method, exc) from None
        raise StreamEnded(f"the agent at {self.client.target} ended {method}")

    def _model(self, message: Any) -> None:
        try:
            delta = model_delta_from_pb(message)
        except ValueError as exc:
            self._bad_delta("model", exc)
            return
        synced_before = self.replica.syncs
        self.replica.apply_model(delta)
        if self.replica.syncs > synced_before:
            self._synced()

    def _gpu(self, message: Any) -> None:
        try:
            delta = gpu_delta_from_pb(message)
        except ValueError as exc:
            self._bad_delta("GPU", exc)
            return
        synced_before = self.replica.syncs
        self.replica.apply_gpu(delta)
        if self.replica.syncs > synced_before:
            self._synced()

    def _bad_delta(self, kind: str, exc: ValueError) -> None:
        if not self.bad_deltas:
            log.error(f"agent sent a malformed {kind} delta; skipping it", error=str(exc))
        self.bad_deltas += 1

    def _synced(self) -> None:
        live = self.replica.live
        targets = len(live.model_states()) if live is not None else 0
        if self.replica.syncs == 1:
            log.info("agent state replica synced", agent=self.client.target, targets=targets)
        else:
            log.info("agent state replica resynced", agent=self.client.target, targets=targets)


def _raise_first_error(tasks: Sequence[asyncio.Future[Any]]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error
    raise StreamEnded("a watch task ended without an error")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

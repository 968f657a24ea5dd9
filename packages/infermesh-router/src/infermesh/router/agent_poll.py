"""The background-task shell every router poller of the agent's State service shares.

A subclass implements `_poll(stub) -> bool` (one call; whether the agent answered). This class
owns the task, the channel (the AgentClient's channel options, so gRPC can share the one
connection to the agent: its subchannel pool is keyed by target and options), the poll interval
and the doubling backoff after a failure. It never ends on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from infermesh.core.proto import state_pb2_grpc
from infermesh.router.agent_client import _CHANNEL_OPTIONS

__all__ = ["AgentPoller"]


class AgentPoller:
    """Polls the agent every `interval_s`, backing off to `backoff_max_s` while it fails."""

    what = "agent poll"
    """Named in the task name and in errors: e.g. "RTT poll"."""

    def __init__(
        self, target: str, *, interval_s: float, backoff_max_s: float, timeout_s: float
    ) -> None:
        if not 0 < interval_s <= backoff_max_s:
            raise ValueError(
                f"{self.what} interval must be > 0 and <= its backoff maximum, got "
                f"{interval_s} and {backoff_max_s}"
            )
        self.target = target
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.polls = 0
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            name = "infermesh-router-" + self.what.replace(" ", "-").lower()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        try:
            stub = state_pb2_grpc.StateStub(channel)
            delay_s = self.interval_s
            while True:
                if await self._poll(stub):
                    delay_s = self.interval_s
                else:
                    delay_s = min(delay_s * 2, self.backoff_max_s)
                await asyncio.sleep(delay_s)
        finally:
            await channel.close()

    async def _poll(self, stub: Any) -> bool:
        """One call to the agent; whether it answered. Must not raise."""
        raise TypeError(f"{type(self).__name__} must implement _poll")

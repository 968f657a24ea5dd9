"""The router's gRPC client to its local agent: Scoring, State (calls and watch streams) and
health over one channel.

One grpc.aio channel per process, opened inside the running loop by `start()`; every unary call
has a deadline and a failure becomes `AgentUnavailable` with a message naming the agent. Never
retries or waits for the agent to appear: the caller decides what to answer.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2, state_pb2_grpc

__all__ = ["AgentClient", "AgentUnavailable"]

SCORING_SERVICE = "infermesh.v1.Scoring"

# A router often starts before its agent: keep reconnect backoff short so the first requests
# after the agent comes up are served instead of failing fast for up to two minutes.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class AgentUnavailable(Exception):
    """The agent could not be reached or failed to answer; the message says which and why."""


class AgentClient:
    """Scoring, State and health calls to one agent at a gRPC `target`."""

    def __init__(self, target: str, *, timeout_s: float = 2.0, models_cache_s: float = 1.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.models_cache_s = models_cache_s
        self._channel: Any = None
        self._scoring: Any = None
        self._state: Any = None
        self._health: Any = None
        self._models: list[str] = []
        self._models_at = -float("inf")

    async def start(self) -> None:
        """Open the channel (lazily connecting); must run inside the serving event loop."""
        if self._channel is not None:
            return
        self._channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._scoring = scoring_pb2_grpc.ScoringStub(self._channel)
        self._state = state_pb2_grpc.StateStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def unavailable(self, method: str, exc: BaseException) -> AgentUnavailable:
        """`exc`, raised by a call to `method`, as an AgentUnavailable naming this agent."""
        if isinstance(exc, grpc.aio.AioRpcError):
            detail = f"{exc.code().name}: {exc.details()}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return AgentUnavailable(
            f"the InferMesh agent at {self.target} did not answer {method} ({detail}); "
            "check that `infermesh agent run` is running and that --agent points at its socket"
        )

    async def _call(self, method: str, stub_method: Any, request: Any) -> Any:
        if self._channel is None:
            raise AgentUnavailable(f"the agent client for {self.target} is not started")
        try:
            return await stub_method(request, timeout=self.timeout_s)
        except (grpc.aio.AioRpcError, OSError) as exc:
            raise self.unavailable(method, exc) from None

    async def score(
        self, request: scoring_pb2.RequestFeatures, max_targets: int
    ) -> scoring_pb2.ScoreTargetsResponse:
        """Ranked targets for `request`, reserving an in-flight slot on the first one."""
        message = scoring_pb2.ScoreTargetsRequest(
            request=request, max_targets=max_targets, reserve=True
        )
        response: scoring_pb2.ScoreTargetsResponse = await self._call(
            "ScoreTargets", self._scoring.ScoreTargets, message
        )
        return response

    async def admit(
        self, request: scoring_pb2.RequestFeatures, target_id: str
    ) -> scoring_pb2.AdmitResponse:
        """A new reservation on `target_id` (used when falling back to a lower-ranked target)."""
        message = scoring_pb2.AdmitRequest(request=request, target_id=target_id)
        response: scoring_pb2.AdmitResponse = await self._call(
            "Admit", self._scoring.Admit, message
        )
        return response

    async def report(self, batch: scoring_pb2.OutcomeBatch) -> int:
        """Send a batch of outcomes; returns how many the agent accepted."""
        ack: scoring_pb2.OutcomeAck = await self._call(
            "ReportOutcome", self._scoring.ReportOutcome, batch
        )
        return ack.accepted

    def watch_model_deltas(self) -> Any:
        """The agent's model deltas as a server stream (no deadline), starting with a snapshot.

        Returns the grpc.aio call: iterate it for `ModelStateDelta`s, `cancel()` it to stop.
        """
        return self._watch(self._state.WatchModelDeltas)

    def watch_gpu_deltas(self) -> Any:
        """The agent's GPU deltas as a server stream, starting with a snapshot (see above)."""
        return self._watch(self._state.WatchGpuDeltas)

    def _watch(self, stub_method: Any) -> Any:
        if self._channel is None:
            raise AgentUnavailable(f"the agent client for {self.target} is not started")
        return stub_method(state_pb2.WatchRequest(initial_snapshot=True))

    async def list_model_states(self) -> state_pb2.ModelStateList:
        states: state_pb2.ModelStateList = await self._call(
            "ListModelStates", self._state.ListModelStates, state_pb2.ListRequest()
        )
        return states

    async def list_gpu_states(self) -> state_pb2.GpuStateList:
        states: state_pb2.GpuStateList = await self._call(
            "ListGpuStates", self._state.ListGpuStates, state_pb2.ListRequest()
        )
        return states

    async def model_names(self, now: float | None = None) -> list[str]:
        """Sorted names of the models some target of the agent has loaded.

        Cached for `models_cache_s` seconds (monotonic clock unless `now` is given).
        """
        now = time.monotonic() if now is None else now
        if now - self._models_at < self.models_cache_s:
            return self._models
        states = await self.list_model_states()
        names = {state.key.model for state in states.states if state.fields.loaded}
        self._models = sorted(name for name in names if name)
        self._models_at = now
        return self._models

    async def health(self) -> tuple[bool, str]:
        """(serving, reason) from the agent's gRPC health service for the Scoring service."""
        try:
            response = await self._call(
                "Health.Check",
                self._health.Check,
                health_pb2.HealthCheckRequest(service=SCORING_SERVICE),
            )
        except AgentUnavailable as exc:
            return False, str(exc)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return False, f"the InferMesh agent at {self.target} reports {SCORING_SERVICE} {status}"
        return True, "ok"

"""gRPC servicer of `infermesh.v1.Scoring`: protobuf in, engine and tracker calls, protobuf out.

A thin shell: every decision is the engine's or the tracker's. Runs on the router's hot path,
so it does no logging per call and never awaits anything but the gRPC context.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from infermesh.agent.api.status import abort
from infermesh.agent.metrics import AgentMetrics
from infermesh.core.convert import request_features_from_pb
from infermesh.core.model import ModelState, TargetKey
from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc
from infermesh.core.scoring.engine import RETRY_TRANSIENT_S, RETRY_UNAVAILABLE_S, ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker, is_target_error
from infermesh.core.target_transport import DEFAULT_TRANSPORT, label_map, transport_of

__all__ = ["DEFAULT_TRANSPORT", "ScoringService"]


class ScoringService(scoring_pb2_grpc.ScoringServicer):
    """ScoreTargets, Admit, ReportOutcome and StreamOutcomes over the engine and tracker.

    `transports` maps a runtime endpoint (base URL) to the transport plugin name the router
    should use for it. A target's own `transport` label wins (a remote Triton says
    `kserve-http` though this node has no `[[runtimes]]` table for it); unlabelled targets on
    unlisted endpoints get DEFAULT_TRANSPORT. Each ranked target carries its labels.
    """

    def __init__(
        self,
        engine: ScoringEngine,
        inflight: InflightTracker,
        metrics: AgentMetrics,
        *,
        transports: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.inflight = inflight
        self.metrics = metrics
        self.transports = dict(transports or {})
        self.clock = clock
        self._score_counters = {
            name: metrics.score_requests.labels(result=name)
            for name in ("ok", "no_targets", "unknown_model", "invalid")
        }

    async def ScoreTargets(
        self, request: scoring_pb2.ScoreTargetsRequest, context: Any
    ) -> scoring_pb2.ScoreTargetsResponse:
        started = time.perf_counter()
        try:
            features = request_features_from_pb(request.request)
        except ValueError as exc:
            self._score_counters["invalid"].inc()
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"ScoreTargets: {exc}")
        now = self.clock()
        ranking = self.engine.rank(features, now, request.max_targets)
        response = scoring_pb2.ScoreTargetsResponse(
            model_known=ranking.model_known,
            candidates=ranking.candidates,
            excluded=[str(e) for e in ranking.excluded],
            retry_after_s=ranking.retry_after_s,
        )
        transports = self.transports
        for ranked in ranking.targets:
            state = ranked.view.state
            key = state.key
            target = response.targets.add(
                target_id=key.target_id,
                runtime=state.labels.runtime,
                transport=transport_of(state.labels, key.endpoint, transports),
                score=ranked.score,
                labels=label_map(state.labels),
            )
            target.key.model = key.model
            target.key.node = key.node
            target.key.endpoint = key.endpoint
            for ws, scored in zip(ranked.scorers, ranked.results, strict=True):
                target.reasons.add(
                    scorer=ws.name, score=scored.score, weight=ws.weight, reason=scored.reason
                )
        if ranking.targets:
            if request.reserve:
                reservation = self.inflight.reserve(ranking.targets[0].target_id, now)
                response.reservation_id = reservation.reservation_id
            result = "ok"
        else:
            result = "no_targets" if ranking.model_known else "unknown_model"
        self._score_counters[result].inc()
        self.metrics.score_duration.observe(time.perf_counter() - started)
        return response

    async def Admit(
        self, request: scoring_pb2.AdmitRequest, context: Any
    ) -> scoring_pb2.AdmitResponse:
        try:
            TargetKey.parse(request.target_id)
            features = request_features_from_pb(request.request)
        except ValueError as exc:
            self.metrics.admits.labels(result="invalid").inc()
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"Admit: {exc}")
        now = self.clock()
        state = self.engine.store.get_target(request.target_id)
        why, retry_after_s = self._admit_refusal(state, features.model, request.target_id)
        if why is None and state is not None:
            exclusion = self.engine.exclusion(state, features, now)
            if exclusion is not None:
                why = exclusion.why
                retry_after_s = RETRY_TRANSIENT_S if exclusion.transient else RETRY_UNAVAILABLE_S
        if why is not None:
            self.metrics.admits.labels(result="rejected").inc()
            return scoring_pb2.AdmitResponse(
                admitted=False, reason=why, retry_after_s=retry_after_s
            )
        reservation = self.inflight.reserve(request.target_id, now)
        self.metrics.admits.labels(result="admitted").inc()
        return scoring_pb2.AdmitResponse(admitted=True, reservation_id=reservation.reservation_id)

    @staticmethod
    def _admit_refusal(
        state: ModelState | None, model: str, target_id: str
    ) -> tuple[str | None, float]:
        if state is None:
            return (
                f"unknown target {target_id!r}: this agent has no state for it",
                RETRY_UNAVAILABLE_S,
            )
        if model != state.key.model and model not in state.adapters:
            return f"target {target_id!r} does not serve model {model!r}", 0.0
        return None, 0.0

    def _record(self, batch: scoring_pb2.OutcomeBatch) -> int:
        accepted = 0
        now = self.clock()
        for outcome in batch.outcomes:
            released = (
                self.inflight.release_outcome(
                    outcome.reservation_id, now, status=outcome.status, latency_s=outcome.latency_s
                )
                if outcome.reservation_id
                else None
            )
            target_id = outcome.target_id or (released.target_id if released else "")
            ttft_s = outcome.ttft_s if outcome.HasField("ttft_s") else None
            if target_id:
                self.inflight.record_outcome(
                    target_id, ok=outcome.ok, status=outcome.status, ttft_s=ttft_s
                )
            if outcome.ok:
                result = "ok"
            elif is_target_error(outcome.ok, outcome.status):
                result = "target_error"
            else:
                result = "client_error"
            self.metrics.outcomes.labels(result=result).inc()
            accepted += 1
        return accepted

    async def ReportOutcome(
        self, request: scoring_pb2.OutcomeBatch, context: Any
    ) -> scoring_pb2.OutcomeAck:
        return scoring_pb2.OutcomeAck(accepted=self._record(request))

    async def StreamOutcomes(
        self, request_iterator: AsyncIterator[scoring_pb2.OutcomeBatch], context: Any
    ) -> scoring_pb2.OutcomeAck:
        accepted = 0
        async for batch in request_iterator:
            accepted += self._record(batch)
        return scoring_pb2.OutcomeAck(accepted=accepted)

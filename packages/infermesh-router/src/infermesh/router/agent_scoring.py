"""`router.scoring = "agent"`: every request is ranked by one ScoreTargets call to the agent.

The agent keeps the reservations (ScoreTargets reserves on the first target, Admit on a
fallback) and releases them from the outcome reports. Converts between protobuf and the
forwarder's `Decision`; holds no state of its own.
"""

from __future__ import annotations

from infermesh.core.convert import request_features_to_pb
from infermesh.core.model import RequestFeatures
from infermesh.core.proto import scoring_pb2
from infermesh.core.target_transport import KSERVE_GRPC_LABEL
from infermesh.router.agent_client import AgentClient
from infermesh.router.decision import DEFAULT_TRANSPORT, Admission, Choice, Decision
from infermesh.router.metrics import RouterMetrics

__all__ = ["AgentScoring"]


class AgentScoring:
    """Ranks through the agent's Scoring API (see `RouteScoring`)."""

    mode = "agent"
    # The agent holds the reservations: release them promptly so its in-flight counts stay right.
    outcome_linger_s = 0.05

    def __init__(self, agent: AgentClient) -> None:
        self.agent = agent

    def attach_metrics(self, metrics: RouterMetrics) -> None:
        """The agent exports the scoring metrics of this mode."""

    async def start(self) -> None:
        """Nothing to start: the agent client's channel is the app's."""

    async def aclose(self) -> None:
        """Nothing to stop."""

    async def score(self, features: RequestFeatures, max_targets: int) -> Decision:
        response = await self.agent.score(request_features_to_pb(features), max_targets)
        choices = tuple(
            [
                Choice(
                    target.target_id,
                    target.key.endpoint,
                    target.transport or DEFAULT_TRANSPORT,
                    target.labels.get(KSERVE_GRPC_LABEL, ""),
                )
                for target in response.targets
            ]
        )
        if choices:
            return Decision(True, choices, response.reservation_id, response.candidates)
        return Decision(
            response.model_known,
            (),
            "",
            response.candidates,
            tuple(response.excluded),
            response.retry_after_s,
        )

    async def admit(self, features: RequestFeatures, choice: Choice) -> Admission:
        admitted = await self.agent.admit(request_features_to_pb(features), choice.target_id)
        if admitted.admitted:
            return Admission(admitted.reservation_id)
        return Admission(None, admitted.reason)

    def finished(self, outcome: scoring_pb2.Outcome) -> None:
        """The agent releases the reservation when the outcome report reaches it."""

    async def model_names(self) -> list[str]:
        return await self.agent.model_names()

    async def health(self) -> tuple[bool, str]:
        return await self.agent.health()

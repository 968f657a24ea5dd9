"""`router.scoring = "local"`: requests are ranked in the router, on a replica of the agent's state.

The same `ScoringEngine` and scorers as the agent (loaded through the plugin host, weighted by
the same `[scoring]` config) rank a `StateReplica` that the `StateWatcher` keeps in step with the
agent's watch streams. The router holds its own in-flight reservations and outcome EWMAs; the
outcomes still go to the agent (by the forwarder), so its EWMAs and metrics learn too. The
agent's gossip RTT estimates to other nodes (polled by an `RttWatcher`) feed net_penalty, and
the agent's operator policy (polled by a `PolicyWatcher`: drains, pins, scoring weights) steers
the ranking as it does the agent's.
Never does I/O on the request path: `score` is a synchronous computation behind an async API.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import Scorer
from infermesh.core.model import RequestFeatures
from infermesh.core.policy import PolicySet
from infermesh.core.proto import scoring_pb2
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.state import StateStore
from infermesh.core.target_transport import KSERVE_GRPC_LABEL, transport_of
from infermesh.router.agent_client import AgentClient, AgentUnavailable
from infermesh.router.decision import Admission, Choice, Decision
from infermesh.router.metrics import RouterMetrics
from infermesh.router.policy_watch import PolicyWatcher
from infermesh.router.replica import NodeRtts, StateReplica
from infermesh.router.rtt_watch import RttWatcher
from infermesh.router.state_watch import StateWatcher

__all__ = ["LocalScoring"]


class LocalScoring:
    """Ranks in process (see `RouteScoring`).

    `registered` are the scorers by name (`PluginHost.scorers()`), `scoring` the `[scoring]`
    config; `transports` maps a runtime base URL to its transport plugin name (from the
    `[[runtimes]]` tables), used for targets without a `transport` label of their own (the
    Triton adapter labels its targets `kserve-http`, so remote Tritons need no entry here);
    others use `openai-http`. `rtt_poll_s` is (interval, backoff
    maximum) of polling the agent's RTT estimates, `policy_poll_s` the same for its policy.
    Raises `ScoringSetupError` for a scoring
    config the engine refuses, `ValueError` for a bad `scoring.outcome_ewma_alpha`.
    """

    mode = "local"
    # The router releases its own reservations; the agent only learns EWMAs and counts from the
    # reports, so they can gather longer, which makes each ReportOutcome call carry more.
    outcome_linger_s = 0.25

    def __init__(
        self,
        agent: AgentClient,
        registered: Mapping[str, Scorer],
        scoring: ScoringConfig,
        *,
        transports: Mapping[str, str] | None = None,
        watcher_backoff_s: tuple[float, float] = (0.1, 2.0),
        rtt_poll_s: tuple[float, float] = (2.0, 30.0),
        policy_poll_s: tuple[float, float] = (1.0, 30.0),
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.config = scoring
        self.transports = dict(transports or {})
        self.clock = clock
        self.monotonic = monotonic
        self._registered = dict(registered)
        # "router-" is not hex, so these ids can never match a reservation of the agent's.
        self.inflight = InflightTracker(
            ewma_alpha=scoring.outcome_ewma_alpha, id_prefix=f"router-{secrets.token_hex(4)}"
        )
        self.rtts = NodeRtts()
        """The agent's RTT estimates by node: the engine's `rtt_estimate`, for net_penalty."""
        # Built now so that a bad scoring config fails at start-up, not on the first request.
        self.engine = ScoringEngine.from_config(
            StateStore(), self.inflight, self._registered, scoring, rtt_estimate=self.rtts.get
        )
        self.replica = StateReplica(on_swap=self._use_store)
        initial_s, max_s = watcher_backoff_s
        self.watcher = StateWatcher(
            agent, self.replica, backoff_initial_s=initial_s, backoff_max_s=max_s, clock=monotonic
        )
        interval_s, rtt_backoff_max_s = rtt_poll_s
        self.rtt_watcher = RttWatcher(
            agent.target,
            self.rtts,
            interval_s=interval_s,
            backoff_max_s=rtt_backoff_max_s,
            timeout_s=agent.timeout_s,
        )
        policy_interval_s, policy_backoff_max_s = policy_poll_s
        self.policy_watcher = PolicyWatcher(
            agent.target,
            self._use_policy,
            interval_s=policy_interval_s,
            backoff_max_s=policy_backoff_max_s,
            timeout_s=agent.timeout_s,
        )

    def _use_store(self, store: StateStore) -> None:
        # A resync brings a whole new store; reservations and EWMAs carry over by target id, and
        # the policy in force carries over to the new engine.
        engine = ScoringEngine.from_config(
            store, self.inflight, self._registered, self.config, rtt_estimate=self.rtts.get
        )
        engine.set_policy(self.policy_watcher.policy)
        self.engine = engine

    def _use_policy(self, policy: PolicySet) -> None:
        self.engine.set_policy(policy)

    def attach_metrics(self, metrics: RouterMetrics) -> None:
        metrics.watch_replica(self.replica, self.inflight)

    async def start(self) -> None:
        self.watcher.start()
        self.rtt_watcher.start()
        self.policy_watcher.start()

    async def aclose(self) -> None:
        await self.policy_watcher.aclose()
        await self.rtt_watcher.aclose()
        await self.watcher.aclose()

    def _live(self) -> StateStore:
        store = self.replica.live
        if store is None:
            raise AgentUnavailable(self._status()[1])
        return store

    def _status(self) -> tuple[bool, str]:
        status = self.replica.status(self.monotonic(), self.config.stale_after_s, self.agent.target)
        return status.ready, status.reason

    async def score(self, features: RequestFeatures, max_targets: int) -> Decision:
        if self.replica.live is None:
            raise AgentUnavailable(self._status()[1])
        now = self.clock()
        ranking = self.engine.rank(features, now, max_targets)
        ranked = ranking.targets
        if not ranked:
            return Decision(
                ranking.model_known,
                (),
                "",
                ranking.candidates,
                tuple([str(exclusion) for exclusion in ranking.excluded]),
                ranking.retry_after_s,
            )
        transports = self.transports
        choices = []
        for target in ranked:
            state = target.view.state
            endpoint = state.key.endpoint
            choices.append(
                Choice(
                    target.target_id,
                    endpoint,
                    transport_of(state.labels, endpoint, transports),
                    state.labels.get(KSERVE_GRPC_LABEL) or "",
                )
            )
        reservation = self.inflight.reserve(choices[0].target_id, now)
        return Decision(True, tuple(choices), reservation.reservation_id, ranking.candidates)

    async def admit(self, features: RequestFeatures, choice: Choice) -> Admission:
        """What the agent's Admit does: the target must still serve the model and pass filters."""
        state = self._live().get_target(choice.target_id)
        if state is None:
            return Admission(None, f"unknown target {choice.target_id!r}")
        if features.model != state.key.model and features.model not in state.adapters:
            return Admission(None, f"target {choice.target_id!r} does not serve {features.model!r}")
        now = self.clock()
        exclusion = self.engine.exclusion(state, features, now)
        if exclusion is not None:
            return Admission(None, exclusion.why)
        return Admission(self.inflight.reserve(choice.target_id, now).reservation_id)

    def finished(self, outcome: scoring_pb2.Outcome) -> None:
        """Release the reservation and fold the outcome into this router's EWMAs (what the
        agent does with an outcome report)."""
        if outcome.reservation_id:
            self.inflight.release_outcome(
                outcome.reservation_id,
                self.clock(),
                status=outcome.status,
                latency_s=outcome.latency_s,
            )
        if outcome.target_id:
            ttft_s = outcome.ttft_s if outcome.HasField("ttft_s") else None
            self.inflight.record_outcome(
                outcome.target_id, ok=outcome.ok, status=outcome.status, ttft_s=ttft_s
            )

    async def model_names(self) -> list[str]:
        """Models of the targets the agent reports loaded (what its ListModelStates shows)."""
        states = self._live().model_states()
        return sorted({state.key.model for state in states if state.loaded and state.key.model})

    async def health(self) -> tuple[bool, str]:
        return self._status()

"""The async shell around admission: quotas, saturation shedding and SLO-class queues per request.

`async with gate.admit(features) as admitted:` returns at once, after a wait in the class's
bounded queue, or raises `ApiError(429)` with an OpenAI-style body and `Retry-After`; leaving the
block (done, failed, cancelled, client gone) frees the slot and settles the tenant's tokens. The
decisions are the pure `AdmissionQueues`, `TenantQuotas` and `fleet_saturation`; this module only
waits, wakes waiters and counts. It never touches the request or the response.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from infermesh.core.config import AdmissionConfig, SloAdmissionConfig
from infermesh.core.model import ModelState, RequestFeatures, SloClass
from infermesh.core.policy import PolicySet
from infermesh.core.proto import scoring_pb2
from infermesh.router.admission import (
    KEEP_MODELS,
    AdmissionQueues,
    ClassLimits,
    Queued,
    Refusal,
    Ticket,
    Waiter,
    WaiterState,
)
from infermesh.router.agent_poll import AgentPoller
from infermesh.router.decision import RouteScoring
from infermesh.router.errors import ApiError
from infermesh.router.fleet_watch import FleetWatcher
from infermesh.router.local_scoring import LocalScoring
from infermesh.router.metrics import LATENCY_BUCKETS_S, FastHistogram, RouterMetrics
from infermesh.router.policy_watch import PolicyWatcher
from infermesh.router.quotas import QuotaGrant, QuotaRefusal, TenantQuotas
from infermesh.router.saturation import SaturationThresholds, fleet_saturation, sheds

__all__ = ["AdmissionGate", "Admitted", "FleetView", "class_limits", "views_of"]

FleetView = Callable[[str], Sequence[ModelState] | None]
"""A model's replicas as the router sees them: () for a model no replica serves (admission is
skipped; the forwarder answers 404), None when the scoring mode has no view (agent mode)."""
PolicySource = Callable[[], PolicySet]

LARGE_FLEET = 1000
"""Above this many replicas a model's saturation is recomputed at most every
`LARGE_FLEET_REFRESH_S`, not on every change of its candidates."""
LARGE_FLEET_REFRESH_S = 0.1

OVERLOADED = "overloaded"
RATE_LIMITED = "rate_limit_exceeded"
OVERLOADED_TYPE = "overloaded_error"


@attrs.define(eq=False)
class Admitted:
    """A request let through: how long it queued, and the tokens its outcomes reported."""

    features: RequestFeatures
    queued_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ticket: Ticket | None = None
    grant: QuotaGrant | None = None


def views_of(scoring: RouteScoring) -> tuple[FleetView | None, PolicySource | None]:
    """What admission reads from a scoring mode. `local` ranks on a replica of the agent's state
    and follows its policy, so both come from there. `agent` keeps neither in the router (and
    its ScoreTargets call happens inside the forwarder, after admission): (None, None), and
    `AdmissionGate.for_scoring` polls the agent for both."""
    if not isinstance(scoring, LocalScoring):
        return None, None
    local = scoring

    def fleet(model: str) -> Sequence[ModelState] | None:
        store = local.replica.live
        return store.candidates(model) if store is not None else None

    def policy() -> PolicySet:
        return local.policy_watcher.policy

    return fleet, policy


def class_limits(config: SloAdmissionConfig) -> ClassLimits:
    return ClassLimits(
        max_concurrent=config.max_concurrent,
        max_queue=config.max_queue,
        max_queue_wait_s=config.max_queue_wait_s,
        shed_at_load=config.shed_at_load,
    )


class AdmissionGate:
    """Admission for one router process (see the module docstring).

    `fleet` gives a model's replicas for saturation; `policy` the operator policy in force
    (admission limits and tenant quotas; read on each request, applied when it changes).
    `retry_after_s` is the Retry-After of a request shed for saturation.
    """

    def __init__(
        self,
        config: AdmissionConfig,
        metrics: RouterMetrics,
        *,
        fleet: FleetView | None = None,
        policy: PolicySource | None = None,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.fleet = fleet
        self.policy_source = policy
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.thresholds = SaturationThresholds(
            config.saturation_waiting, config.saturation_kv_cache_usage
        )
        self._defaults = {
            SloClass.LATENCY: class_limits(config.latency),
            SloClass.STANDARD: class_limits(config.standard),
            SloClass.BATCH: class_limits(config.batch),
        }
        self._policy = PolicySet()
        self.queues = AdmissionQueues(self.limits, config.max_concurrent_per_model)
        self.quotas = TenantQuotas()
        self._wakeups: dict[Waiter, asyncio.Event] = {}
        self._active: dict[str, Admitted] = {}
        # model -> (the candidates it was computed over, its saturation, when computed)
        self._saturation: dict[str, tuple[Sequence[ModelState], float | None, float]] = {}
        self._metrics = _AdmissionMetrics(self, metrics)
        self._pollers: list[AgentPoller] = []
        self.policy_watcher: PolicyWatcher | None = None
        """The gate's own GetPolicy poll (agent scoring mode only)."""

    @classmethod
    def for_scoring(
        cls,
        config: AdmissionConfig,
        metrics: RouterMetrics,
        scoring: RouteScoring,
        *,
        retry_after_s: float = 1.0,
    ) -> AdmissionGate:
        """The gate of a router in this scoring mode: local mode lends its replica and policy;
        in agent mode the gate polls the agent's model states and policy itself (from `start`,
        every second: saturation there is up to a second older than in local mode)."""
        fleet, policy = views_of(scoring)
        if fleet is not None and policy is not None:
            return cls(config, metrics, fleet=fleet, policy=policy, retry_after_s=retry_after_s)
        agent = scoring.agent
        fleet_watcher = FleetWatcher(agent.target, timeout_s=agent.timeout_s)
        policy_watcher = PolicyWatcher(agent.target, _ignore, timeout_s=agent.timeout_s)
        gate = cls(
            config,
            metrics,
            fleet=fleet_watcher.fleet,
            policy=_policy_of(policy_watcher),
            retry_after_s=retry_after_s,
        )
        gate._pollers = [fleet_watcher, policy_watcher]
        gate.policy_watcher = policy_watcher
        return gate

    def start(self) -> None:
        """Start polling the agent, when this gate does so itself (agent scoring mode)."""
        for poller in self._pollers:
            poller.start()

    async def aclose(self) -> None:
        for poller in self._pollers:
            await poller.aclose()

    # ------------------------------------------------------------------ policy

    def limits(self, model: str, slo: SloClass) -> ClassLimits:
        """The class's config limits, each overridden by the policy's `admission` entry for
        (model, class) when that entry sets it."""
        default = self._defaults[slo]
        override = self._policy.admission_for(model, slo)
        if override is None:
            return default
        return ClassLimits(
            max_concurrent=_first(override.max_concurrent, default.max_concurrent),
            max_queue=_first(override.max_queue, default.max_queue),
            max_queue_wait_s=default.max_queue_wait_s,
            shed_at_load=_first(override.shed_at_load, default.shed_at_load),
        )

    def use_policy(self, policy: PolicySet) -> None:
        """Apply a new operator policy: quotas restart for tenants whose quota changed, and
        waiters that a raised limit now lets in are admitted."""
        if policy is self._policy:
            return
        now = self.clock()
        self._policy = policy
        self.quotas.update(policy.quotas, now)
        self._wake(self.queues.pump(now))

    def policy(self) -> PolicySet:
        """The operator policy in force for this router, in either scoring mode (local mode:
        the replica's; agent mode: this gate's own GetPolicy poll). The forwarder reads its
        hedging rules from here."""
        if self.policy_source is not None:
            return self.policy_source()
        return self._policy

    def _follow_policy(self) -> None:
        if self.policy_source is not None:
            self.use_policy(self.policy_source())

    # ------------------------------------------------------------------ requests

    @asynccontextmanager
    async def admit(self, features: RequestFeatures) -> AsyncIterator[Admitted]:
        """Hold a slot (and the tenant's quota) for the block; raises ApiError(429) instead."""
        self._follow_policy()
        admitted = Admitted(features)
        grant = self._take_quota(features)
        admitted.grant = grant
        let_in = False
        try:
            if self.config.enabled and self._admission_applies(features):
                admitted.ticket = await self._take_slot(features)
                admitted.queued_s = admitted.ticket.queued_s
            # A client may reuse an x-request-id: the first request with it gets the token counts.
            self._active.setdefault(features.request_id, admitted)
            let_in = True
            yield admitted
        finally:
            if self._active.get(features.request_id) is admitted:
                del self._active[features.request_id]
            now = self.clock()
            if admitted.ticket is not None:
                self._wake(self.queues.release(admitted.ticket, now))
            if let_in:
                self.quotas.release(grant, now, admitted.prompt_tokens, admitted.completion_tokens)
            else:  # refused (or gone) before forwarding: the tenant is not charged
                self.quotas.refund(grant, now)

    def outcome(self, outcome: scoring_pb2.Outcome) -> None:
        """An attempt of an admitted request ended: note its real token counts for the quota."""
        admitted = self._active.get(outcome.request_id)
        if admitted is not None:
            admitted.prompt_tokens = outcome.prompt_tokens or admitted.prompt_tokens
            admitted.completion_tokens += outcome.completion_tokens

    def _take_quota(self, features: RequestFeatures) -> QuotaGrant:
        verdict = self.quotas.acquire(features.tenant, features.prompt_tokens, self.clock())
        if isinstance(verdict, QuotaRefusal):
            self._metrics.rejected(features, verdict.reason)
            kind = "tokens" if verdict.reason == "quota_tokens" else "requests"
            raise ApiError(
                429,
                verdict.message,
                error_type=kind,
                code=RATE_LIMITED,
                retry_after_s=verdict.retry_after_s,
            )
        return verdict

    def _admission_applies(self, features: RequestFeatures) -> bool:
        if self.fleet is None:
            return True
        replicas = self.fleet(features.model)
        if replicas is None:
            return True
        if not replicas:
            return False  # no replica serves the model: the forwarder answers 404
        saturation = self._saturation_of(features.model, replicas)
        shed_at = self.limits(features.model, features.slo_class).shed_at_load
        if sheds(saturation, shed_at):
            self._metrics.rejected(features, "saturated")
            raise ApiError(
                429,
                f"the replicas of model {features.model!r} are saturated "
                f"({saturation:.0%} of capacity, above the {shed_at:.0%} at which "
                f"{features.slo_class.value} requests are shed); retry after the Retry-After "
                "delay or send it with a higher x-infermesh-slo class",
                error_type=OVERLOADED_TYPE,
                code=OVERLOADED,
                retry_after_s=self.retry_after_s,
            )
        return True

    def saturated(self, model: str) -> bool:
        """Whether admission sheds some class of `model` now (its fleet's saturation is above
        the lowest `shed_at_load`): the forwarder sends no hedges then, since extra attempts
        would add load while real requests are refused."""
        replicas = self.fleet(model) if self.fleet is not None else None
        if not replicas:
            return False
        lowest = min(self.limits(model, slo).shed_at_load for slo in SloClass)
        return sheds(self._saturation_of(model, replicas), lowest)

    def _saturation_of(self, model: str, replicas: Sequence[ModelState]) -> float | None:
        # The state store hands out the same tuple of candidates until one of them changes, so
        # the mean is computed once per change, not once per request. A big fleet changes on
        # almost every delta and costs ~1 µs a replica to average: there it is recomputed at
        # most every `LARGE_FLEET_REFRESH_S` (telemetry is scraped every 0.5 s or slower).
        cached = self._saturation.get(model)
        now = self.clock()
        if cached is not None and (
            cached[0] is replicas
            or (len(replicas) > LARGE_FLEET and 0.0 <= now - cached[2] < LARGE_FLEET_REFRESH_S)
        ):
            return cached[1]
        saturation = fleet_saturation(replicas, self.thresholds)
        if len(self._saturation) >= KEEP_MODELS:
            self._saturation.clear()
        self._saturation[model] = (replicas, saturation, now)
        return saturation

    async def _take_slot(self, features: RequestFeatures) -> Ticket:
        model, slo = features.model, features.slo_class
        verdict = self.queues.arrive(model, slo, self.clock())
        if isinstance(verdict, Ticket):
            self._metrics.waited(model, slo, 0.0)
            return verdict
        if isinstance(verdict, Refusal):
            raise self._refusal(features, verdict.reason, verdict.message, verdict.retry_after_s)
        assert isinstance(verdict, Queued)
        return await self._wait(features, verdict.waiter)

    async def _wait(self, features: RequestFeatures, waiter: Waiter) -> Ticket:
        woken = self._wakeups[waiter] = asyncio.Event()
        try:
            while waiter.state is WaiterState.QUEUED:
                remaining_s = waiter.deadline - self.clock()
                if remaining_s <= 0:
                    self._wake(self.queues.expire(self.clock()))
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining_s):
                        await woken.wait()
        except BaseException:
            self._wake(self.queues.abandon(waiter, self.clock()))
            raise
        finally:
            self._wakeups.pop(waiter, None)
        if waiter.state is WaiterState.ADMITTED and waiter.ticket is not None:
            self._metrics.waited(features.model, features.slo_class, waiter.ticket.queued_s)
            return waiter.ticket
        limits = self.limits(features.model, features.slo_class)
        raise self._refusal(
            features,
            "queue_timeout",
            f"{features.slo_class.value} request to model {features.model!r} waited "
            f"{limits.max_queue_wait_s:g} s (max_queue_wait_s) without a free slot; "
            "retry after the Retry-After delay",
            waiter.retry_after_s,
        )

    def _refusal(
        self, features: RequestFeatures, reason: str, message: str, retry_after_s: float
    ) -> ApiError:
        self._metrics.rejected(features, reason)
        return ApiError(
            429,
            message,
            error_type=OVERLOADED_TYPE,
            code=OVERLOADED,
            retry_after_s=retry_after_s,
        )

    def _wake(self, waiters: list[Waiter]) -> None:
        for waiter in waiters:
            event = self._wakeups.get(waiter)
            if event is not None:
                event.set()


_T = TypeVar("_T")


def _ignore(policy: PolicySet) -> None:
    """The gate reads `PolicyWatcher.policy` on each request; nothing to do when it changes."""


def _policy_of(poller: PolicyWatcher) -> PolicySource:
    return lambda: poller.policy


def _first(value: _T | None, default: _T) -> _T:
    return default if value is None else value


class _AdmissionMetrics(Collector):
    """`infermesh_router_admission_*`: queue waits, refusals, and in-flight/queued levels."""

    def __init__(self, gate: AdmissionGate, metrics: RouterMetrics) -> None:
        self.gate = gate
        self.metrics = metrics
        self.waits: dict[tuple[str, str], FastHistogram] = {}
        self._rejected = Counter(
            "infermesh_router_admission_rejected",
            "Requests refused with 429 by admission, by reason: saturated, queue_full, "
            "queue_timeout, quota_concurrent, quota_requests, quota_tokens.",
            ["model", "slo_class", "reason"],
            registry=metrics.registry,
        )
        metrics.registry.register(self)

    def label(self, model: str) -> str:
        """The `model` label: a model no replica serves is `other`, others as RouterMetrics
        bounds them (in agent mode the router cannot tell; the bound still holds)."""
        fleet = self.gate.fleet
        if fleet is not None and fleet(model) == ():
            return "other"
        return self.metrics.model_label(model)

    def waited(self, model: str, slo: SloClass, seconds: float) -> None:
        key = (self.label(model), slo.value)
        histogram = self.waits.get(key)
        if histogram is None:
            histogram = self.waits[key] = FastHistogram(LATENCY_BUCKETS_S)
        histogram.observe(seconds)

    def rejected(self, features: RequestFeatures, reason: str) -> None:
        self._rejected.labels(self.label(features.model), features.slo_class.value, reason).inc()

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "slo_class"]
        waits = HistogramMetricFamily(
            "infermesh_router_admission_queue_wait_seconds",
            "Time admitted requests waited for a slot (0 when one was free on arrival).",
            labels=labels,
        )
        for (model, slo), histogram in sorted(self.waits.items()):
            waits.add_metric([model, slo], histogram.cumulative(), histogram.sum)
        yield waits
        in_flight = GaugeMetricFamily(
            "infermesh_router_admission_in_flight",
            "Admitted requests holding a slot, by model and SLO class.",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            "infermesh_router_admission_queued",
            "Requests waiting for a slot, by model and SLO class.",
            labels=labels,
        )
        levels: dict[tuple[str, str], tuple[int, int]] = {}
        for model, slo_class, running, waiting in self.gate.queues.levels():
            key = (self.metrics.model_label(model), slo_class.value)
            before = levels.get(key, (0, 0))
            levels[key] = (before[0] + running, before[1] + waiting)
        for key in sorted(set(levels) | set(self.waits)):
            running, waiting = levels.get(key, (0, 0))
            in_flight.add_metric(list(key), running)
            queued.add_metric(list(key), waiting)
        yield in_flight
        yield queued

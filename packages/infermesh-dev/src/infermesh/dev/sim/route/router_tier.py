"""The routers in front of the simulated fleet: the live admission and hedging, in virtual time.

Each `SimRouter` is one router process: its own `AdmissionQueues` (slots and bounded queues per
SLO class, from `[router.admission]`'s defaults), saturation shedding by `fleet_saturation` over
the replicas its scoring sees, and its own `HedgePlanner` (TTFT windows and hedge budget, from
`[router.hedging]`'s defaults, no hedge while some class is shed). These are the router's pure
cores, called with the simulator's clock; the simulator plays the forwarder's part (wait, wake,
fire the hedge, cancel the loser). A load balancer spreads arriving requests over the routers
in turn; by default there is one router per node of 8 replicas (each beside its node's agent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs

from infermesh.core.config import AdmissionConfig, HedgingConfig
from infermesh.core.model import ModelState, SloClass
from infermesh.core.policy import PolicySet
from infermesh.dev.sim.route.strategy import SimRequest
from infermesh.router.admission import (
    AdmissionQueues,
    ClassLimits,
    Queued,
    Refusal,
    Ticket,
    Waiter,
)
from infermesh.router.admission_gate import class_limits
from infermesh.router.hedging import HedgePlan, HedgePlanner
from infermesh.router.saturation import SaturationThresholds, fleet_saturation, sheds

__all__ = ["MODEL", "FleetOf", "RouterSpec", "RouterTier", "SimRouter"]

MODEL = "sim-model"

FleetOf = Callable[[SimRequest], Sequence[ModelState]]
"""The replicas the router's scoring would rank a request against (its cell's candidates)."""


@attrs.frozen
class RouterSpec:
    """What the routers in front of the fleet do besides ranking (live defaults)."""

    admission: bool = True
    hedging: bool = True
    routers: int | None = None
    """How many router processes; None: one per node of 8 replicas."""
    admission_config: AdmissionConfig = attrs.field(factory=AdmissionConfig)
    hedging_config: HedgingConfig = attrs.field(factory=HedgingConfig)

    def __attrs_post_init__(self) -> None:
        if self.routers is not None and self.routers < 1:
            raise ValueError("routers must be at least 1")


class _Saturation:
    """Fleet saturation per candidates tuple, shared by the routers (the store hands out the same
    tuple until a replica changes, so the mean is computed once per change, as the gate does)."""

    def __init__(self, thresholds: SaturationThresholds) -> None:
        self.thresholds = thresholds
        self._last: dict[int, tuple[Sequence[ModelState], float | None]] = {}

    def of(self, replicas: Sequence[ModelState]) -> float | None:
        cached = self._last.get(id(replicas))
        if cached is not None and cached[0] is replicas:
            return cached[1]
        value = fleet_saturation(replicas, self.thresholds)
        if len(self._last) >= 4096:
            self._last.clear()
        self._last[id(replicas)] = (replicas, value)
        return value


class SimRouter:
    """One router process's admission and hedging state."""

    def __init__(self, spec: RouterSpec, saturation: _Saturation, fleet_of: FleetOf) -> None:
        config = spec.admission_config
        self.spec = spec
        self._saturation = saturation
        self._fleet_of = fleet_of
        self._limits: dict[SloClass, ClassLimits] = {
            SloClass.LATENCY: class_limits(config.latency),
            SloClass.STANDARD: class_limits(config.standard),
            SloClass.BATCH: class_limits(config.batch),
        }
        self._lowest_shed = min(limits.shed_at_load for limits in self._limits.values())
        self.queues = AdmissionQueues(self._class_limits, config.max_concurrent_per_model)
        self.hedger = HedgePlanner(spec.hedging_config, self._saturated)
        self._policy = PolicySet()
        self._hedge_saturation: float | None = None

    def _class_limits(self, model: str, slo: SloClass) -> ClassLimits:
        return self._limits[slo]

    def _saturated(self, model: str) -> bool:
        return sheds(self._hedge_saturation, self._lowest_shed)

    def arrive(self, request: SimRequest, now: float) -> Ticket | Waiter | str | None:
        """A request reaches this router: a Ticket (run now), a Waiter (queued), a refusal
        reason (`saturated`, `queue_full`), or None when admission is off (run now)."""
        if not self.spec.admission:
            return None
        slo = SloClass(request.slo_class)
        saturation = self._saturation.of(self._fleet_of(request))
        if sheds(saturation, self._limits[slo].shed_at_load):
            return "saturated"
        verdict = self.queues.arrive(MODEL, slo, now)
        if isinstance(verdict, Refusal):
            return verdict.reason
        if isinstance(verdict, Queued):
            return verdict.waiter
        return verdict

    def plan(self, request: SimRequest) -> HedgePlan | None:
        """Whether and when this dispatched request may be hedged (None: hedging off)."""
        if not self.spec.hedging:
            return None
        plan = self.hedger.plan(
            MODEL, SloClass(request.slo_class), request.prompt_tokens, True, self._policy
        )
        return plan if plan.enabled else None

    def may_fire(self, request: SimRequest) -> str:
        """At the hedge delay: "" when the hedge may go, else why not (`saturated`, `budget`)."""
        self._hedge_saturation = self._saturation.of(self._fleet_of(request))
        return self.hedger.may_fire(MODEL)

    def observe_ttft(self, request: SimRequest, seconds: float) -> None:
        if self.spec.hedging:
            self.hedger.observe_ttft(MODEL, request.prompt_tokens, seconds)


class RouterTier:
    """The routers in front of the fleet; arrivals go to them in turn."""

    def __init__(self, spec: RouterSpec, replicas: int, fleet_of: FleetOf) -> None:
        count = spec.routers if spec.routers is not None else -(-replicas // 8)
        config = spec.admission_config
        saturation = _Saturation(
            SaturationThresholds(config.saturation_waiting, config.saturation_kv_cache_usage)
        )
        self.routers = [SimRouter(spec, saturation, fleet_of) for _ in range(count)]
        self._next = 0

    def next_router(self) -> SimRouter:
        router = self.routers[self._next]
        self._next = (self._next + 1) % len(self.routers)
        return router

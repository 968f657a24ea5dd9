"""The simulated fleet: engine-model replicas, delayed telemetry and network RTT, in virtual time.

One event heap drives everything; each event costs O(log events), so a routing decision's cost
is the strategy's own. Replicas are `infermesh.dev.engine.Engine`s stepped back to back while
they have work. A request reaches its replica half an RTT after the router chose it, and its
tokens reach the client half an RTT after the step that made them. Telemetry is scraped from
each replica every `scrape_interval_s` (each replica at its own phase) and reaches the router
`telemetry_delay_s` later, as a gossiped delta would; the router's own in-flight count is exact.
With `gpu_telemetry`, each scrape also carries the replica's GPU state (`gpu_telemetry.py`: the
degraded replica's GPU reports thermal throttling), for strategies that read it (InferMesh).

With a `RouterSpec`, the routers' admission and hedging (`router_tier.py`) run in the loop for a
strategy that exposes `fleet_of` (InferMesh): a request may be refused or queued on arrival, and
a request without a first token after the hedge delay gets a second attempt on the next-ranked
replica; the first attempt to produce a token wins (decided when the step that made it ends) and
the other is aborted on its engine when the cancel reaches it. A hedge is extra load: its tokens
and GPU time count, the request is counted once.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator

import attrs

from infermesh.core.model import GpuState
from infermesh.dev.engine import Engine, EngineConfig, EngineRequest, StepResult
from infermesh.dev.profiles import get_profile
from infermesh.dev.sim.route.gpu_telemetry import gpu_state
from infermesh.dev.sim.route.router_tier import RouterSpec, RouterTier, SimRouter
from infermesh.dev.sim.route.strategy import (
    ReplicaView,
    SimRequest,
    Strategy,
    prompt_token_ids,
)
from infermesh.router.admission import Ticket, Waiter

__all__ = ["FleetSpec", "RequestRecord", "RunResult", "World", "build_views"]

GPUS_PER_NODE = 8

# Event kinds, in the order same-time events are handled.
_STEP_END = 0
_SUBMIT = 1
_FINISH_SEEN = 2
_DELIVER = 3
_SCRAPE = 4
_ARRIVE = 5
_CANCEL = 6
_EXPIRE = 7
_HEDGE = 8


@attrs.frozen
class FleetSpec:
    """The replicas and the network between them and the router."""

    replicas: int
    profiles: tuple[str, ...] = ("h100", "a100", "a10")
    """GPU profile of each node (8 replicas), in turn."""
    degraded: int = 0
    """How many replicas (chosen by the seed) run at `degraded_speed` of their profile."""
    degraded_speed: float = 0.3
    rtt_min_s: float = 0.0002
    rtt_max_s: float = 0.004
    """Each node's router<->replica RTT is drawn uniformly from [min, max]."""
    scrape_interval_s: float = 0.5
    telemetry_delay_s: float = 0.05
    """Scrape to router: the agent's delta and its gossip to the router's node."""
    kv_blocks_cap: int | None = None
    """Cap each replica's KV blocks (large fleets: ~1 MB of memory per 8k blocks)."""
    gpu_telemetry: bool = True
    """Scrapes also carry each replica's GPU state (the DCGM adapter's view)."""

    def __attrs_post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("the fleet needs at least one replica")
        if not 0 <= self.degraded <= self.replicas:
            raise ValueError("degraded must be between 0 and the number of replicas")
        if not 0.0 < self.degraded_speed <= 1.0:
            raise ValueError("degraded_speed must be in (0, 1]")
        if not 0.0 <= self.rtt_min_s <= self.rtt_max_s:
            raise ValueError("need 0 <= rtt_min_s <= rtt_max_s")
        if self.scrape_interval_s <= 0 or self.telemetry_delay_s < 0:
            raise ValueError("scrape interval must be positive and the delay non-negative")
        for name in self.profiles:
            get_profile(name)


@attrs.define(eq=False)
class RequestRecord:
    """What happened to one request (times are virtual seconds, as the client sees them)."""

    request: SimRequest
    replica_id: str | None = None
    rejected: bool = False
    first_token_s: float | None = None
    finished_s: float | None = None
    cached_tokens: int = 0
    reject_reason: str = ""
    """`saturated`, `queue_full`, `queue_timeout` (admission), `no_replica`, `too_long`."""
    attempts: dict[str, float] = attrs.Factory(dict)
    """Replica id -> when the router sent it an attempt (the first, then hedges)."""
    winner: str | None = None
    """The attempt whose first token came first (the one the client is served from)."""
    router: SimRouter | None = None
    ticket: Ticket | None = None
    backups: tuple[str, ...] = ()
    """Next-ranked replicas a hedge may go to."""
    hedges_left: int = 0
    hedge_delay_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.request.arrival_s

    @property
    def e2e_s(self) -> float | None:
        if self.finished_s is None:
            return None
        return self.finished_s - self.request.arrival_s


@attrs.define
class RunResult:
    """Everything the metrics need from one run."""

    records: list[RequestRecord]
    end_s: float
    busy_s: float
    """Sum over replicas of the time they spent in steps (GPU-seconds)."""
    prefix_query_tokens: int
    prefix_hit_tokens: int
    preemptions: int
    events: int
    degraded: tuple[str, ...]
    window_s: float = 0.0
    """The arrival window: first arrival to the end of arrivals."""
    window_output_tokens: int = 0
    """Output tokens that reached clients within the arrival window."""
    hedges: int = 0
    hedges_denied: dict[str, int] = attrs.Factory(dict)
    """Hedges not sent at the delay, by reason (`budget`, `saturated`)."""
    hedge_wasted_tokens: int = 0
    """Output tokens made by attempts that lost the race before they were cancelled."""


@attrs.define(eq=False)
class _Window:
    """Sums since the last scrape, for windowed means and rates."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    itl_sum: float = 0.0
    itl_count: int = 0
    e2e_sum: float = 0.0
    e2e_count: int = 0
    busy_s: float = 0.0

    def add(self, result: StepResult) -> None:
        stats = result.stats
        self.busy_s += result.duration_s
        self.prompt_tokens += stats.prompt_tokens
        self.generation_tokens += stats.generation_tokens
        self.ttft_sum += sum(stats.ttfts_s)
        self.ttft_count += len(stats.ttfts_s)
        self.itl_sum += sum(stats.itls_s)
        self.itl_count += len(stats.itls_s)
        self.e2e_sum += sum(f.e2e_s for f in stats.finished)
        self.e2e_count += len(stats.finished)


@attrs.frozen
class _Telemetry:
    replica: _Replica
    scraped_s: float
    running: int
    waiting: int
    kv_usage: float
    ttft_s: float | None
    itl_s: float | None
    e2e_s: float | None
    prompt_tokens_per_s: float
    generation_tokens_per_s: float
    gpu: GpuState | None = None


@attrs.define(eq=False)
class _Replica:
    view: ReplicaView
    engine: Engine
    gpu_name: str = ""
    gpu_version: int = 0
    busy: bool = False
    window: _Window = attrs.Factory(_Window)
    window_start_s: float = 0.0


def build_views(fleet: FleetSpec, rng: random.Random) -> tuple[list[ReplicaView], list[str]]:
    """The fleet's replica views and the ids of the degraded replicas, drawn from `rng`."""
    nodes = -(-fleet.replicas // GPUS_PER_NODE)
    rtts = [rng.uniform(fleet.rtt_min_s, fleet.rtt_max_s) for _ in range(nodes)]
    views = [
        ReplicaView(
            replica_id=f"r{index:05d}",
            index=index,
            node=f"node{index // GPUS_PER_NODE:04d}",
            profile=fleet.profiles[(index // GPUS_PER_NODE) % len(fleet.profiles)],
            rtt_s=rtts[index // GPUS_PER_NODE],
        )
        for index in range(fleet.replicas)
    ]
    degraded = sorted(rng.sample(range(fleet.replicas), fleet.degraded))
    return views, [views[i].replica_id for i in degraded]


class World:
    """One run of one strategy over one fleet and one request stream."""

    def __init__(
        self,
        fleet: FleetSpec,
        strategy: Strategy,
        seed: int,
        routers: RouterSpec | None = None,
    ) -> None:
        self.fleet = fleet
        self.strategy = strategy
        rng = random.Random(seed)
        self.views, self.degraded = build_views(fleet, rng)
        degraded = set(self.degraded)
        self._replicas: list[_Replica] = []
        for view in self.views:
            profile = get_profile(view.profile)
            blocks = profile.num_gpu_blocks
            if fleet.kv_blocks_cap is not None:
                blocks = min(blocks, fleet.kv_blocks_cap)
            engine = Engine(EngineConfig.from_profile(profile, num_gpu_blocks=blocks))
            if view.replica_id in degraded:
                engine.speed_factor = fleet.degraded_speed
            view.max_num_seqs = engine.config.max_num_seqs
            self._replicas.append(_Replica(view, engine, gpu_name=profile.gpu_name))
        self._by_id = {r.view.replica_id: r for r in self._replicas}
        self._phases = [rng.uniform(0.0, fleet.scrape_interval_s) for _ in self._replicas]
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._records: dict[str, RequestRecord] = {}
        self._open = 0
        self._arrivals_open = True
        self._window_start = 0.0
        self._window_end = 0.0
        fleet_of = getattr(strategy, "fleet_of", None)
        self._tier: RouterTier | None = None
        if routers is not None and fleet_of is not None:
            self._tier = RouterTier(routers, fleet.replicas, fleet_of)
            if routers.hedging:
                hedges = routers.hedging_config.max_hedges
                strategy.backup_targets = hedges  # type: ignore[attr-defined]
        self._gpu_observer = getattr(strategy, "observe_gpu", None) if fleet.gpu_telemetry else None
        self._waiting: dict[Waiter, RequestRecord] = {}
        self.busy_s = 0.0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.preemptions = 0
        self.events = 0
        self.window_output_tokens = 0
        self.hedges = 0
        self.hedges_denied: dict[str, int] = {}
        self.hedge_wasted_tokens = 0

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, kind, self._seq, payload))

    # ------------------------------------------------------------------ the run

    def run(
        self, requests: Iterable[SimRequest], duration_s: float, drain_s: float = 300.0
    ) -> RunResult:
        """Replay the requests arriving before `duration_s`, then let the fleet drain for at
        most `drain_s`; what is still running (or queued) then counts as in flight."""
        arrivals: Iterator[SimRequest] = iter(requests)
        self._arrivals_open = True
        self._window_end = duration_s
        first = self._next_arrival(arrivals, duration_s)
        self._window_start = min(first.arrival_s, duration_s) if first is not None else 0.0
        for view in self.views:  # the fleet is known, idle, when the run starts
            self.strategy.observe(view, 0.0)
        if self._gpu_observer is not None:
            # ... and so are its GPUs: the agent's DCGM adapter publishes them before traffic
            # arrives (idle; the degraded one already hot).
            for replica in self._replicas:
                self._gpu_observer(replica.view, self._gpu_reading(replica, 0.0, 0.0), 0.0)
        for replica, phase in zip(self._replicas, self._phases, strict=True):
            self._push(phase, _SCRAPE, replica)
        limit = duration_s + drain_s
        now = 0.0
        heap = self._heap
        while heap:
            when, kind, _, payload = heap[0]
            if when > limit:
                break
            heapq.heappop(heap)
            now = when
            self.events += 1
            if kind == _STEP_END:
                assert isinstance(payload, tuple)
                self._step_end(payload[0], payload[1], now)
            elif kind == _SUBMIT:
                assert isinstance(payload, tuple)
                self._submit(payload[0], payload[1], now)
            elif kind == _FINISH_SEEN:
                assert isinstance(payload, RequestRecord)
                self._finish_seen(payload, now)
            elif kind == _DELIVER:
                assert isinstance(payload, _Telemetry)
                self._deliver(payload, now)
            elif kind == _SCRAPE:
                assert isinstance(payload, _Replica)
                self._scrape(payload, now)
            elif kind == _ARRIVE:
                assert isinstance(payload, SimRequest)
                self._arrive(payload, now)
                self._next_arrival(arrivals, duration_s)
            elif kind == _CANCEL:
                assert isinstance(payload, tuple)
                self._cancel(payload[0], payload[1], now)
            elif kind == _EXPIRE:
                assert isinstance(payload, SimRouter)
                for waiter in payload.queues.expire(now):
                    self._reject(self._waiting.pop(waiter), "queue_timeout")
            else:
                assert isinstance(payload, RequestRecord)
                self._hedge(payload, now)
        return RunResult(
            records=list(self._records.values()),
            end_s=now,
            busy_s=self.busy_s,
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            preemptions=self.preemptions,
            events=self.events,
            degraded=tuple(self.degraded),
            window_s=self._window_end - self._window_start,
            window_output_tokens=self.window_output_tokens,
            hedges=self.hedges,
            hedges_denied=dict(sorted(self.hedges_denied.items())),
            hedge_wasted_tokens=self.hedge_wasted_tokens,
        )

    def _next_arrival(self, arrivals: Iterator[SimRequest], duration_s: float) -> SimRequest | None:
        request = next(arrivals, None)
        if request is None or request.arrival_s >= duration_s:
            self._arrivals_open = False
            return None
        self._push(request.arrival_s, _ARRIVE, request)
        return request

    # ------------------------------------------------------------------ handlers

    def _arrive(self, request: SimRequest, now: float) -> None:
        if request.request_id in self._records:
            raise ValueError(f"request id {request.request_id!r} arrived twice")
        record = self._records[request.request_id] = RequestRecord(request)
        if self._tier is not None:
            router = record.router = self._tier.next_router()
            verdict = router.arrive(request, now)
            if isinstance(verdict, str):
                self._reject(record, verdict)
                return
            if isinstance(verdict, Waiter):
                self._waiting[verdict] = record
                self._push(verdict.deadline, _EXPIRE, router)
                return
            record.ticket = verdict
        self._dispatch(record, now)

    def _reject(self, record: RequestRecord, reason: str) -> None:
        record.rejected = True
        record.reject_reason = reason

    def _dispatch(self, record: RequestRecord, now: float) -> None:
        """The router ranks the (admitted) request and sends its first attempt."""
        request = record.request
        replica_id = self.strategy.choose(request, self.views, now)
        backups = getattr(self.strategy, "backups", None)
        ranked = tuple(backups.pop(request.request_id, ())) if backups is not None else ()
        replica = None if replica_id is None else self._by_id.get(replica_id)
        if replica is None or replica_id is None:
            self._reject(record, "no_replica")
            self._release(record, now)
            return
        config = replica.engine.config
        if request.prompt_tokens + request.output_tokens > config.max_model_len:
            self._reject(record, "too_long")
            self._release(record, now)
            cancelled = getattr(self.strategy, "on_cancel", None)
            if cancelled is not None:  # the runtime refuses it: the reservation ends unsent
                cancelled(request, replica_id, now)
            return
        record.replica_id = replica_id
        record.attempts[replica_id] = now
        replica.view.in_flight += 1
        self._open += 1
        self._push(now + replica.view.rtt_s / 2, _SUBMIT, (replica, record))
        if record.router is None or not ranked:
            return
        record.backups = ranked
        plan = record.router.plan(request)
        if plan is not None and record.backups:
            record.hedges_left = plan.max_hedges
            record.hedge_delay_s = plan.delay_s
            self._push(now + plan.delay_s, _HEDGE, record)

    def _release(self, record: RequestRecord, now: float) -> None:
        """Give back the request's admission slot; waiters let in are dispatched now."""
        ticket, router = record.ticket, record.router
        if ticket is None or router is None:
            return
        record.ticket = None
        for waiter in router.queues.release(ticket, now):
            admitted = self._waiting.pop(waiter)
            admitted.ticket = waiter.ticket
            self._dispatch(admitted, now)

    def _hedge(self, record: RequestRecord, now: float) -> None:
        router = record.router
        if record.winner is not None or not record.backups or router is None:
            return
        denied = router.may_fire(record.request)
        if denied:
            self.hedges_denied[denied] = self.hedges_denied.get(denied, 0) + 1
            return
        target, record.backups = record.backups[0], record.backups[1:]
        replica = self._by_id[target]
        record.attempts[target] = now
        record.hedges_left -= 1
        self.hedges += 1
        replica.view.in_flight += 1
        self._push(now + replica.view.rtt_s / 2, _SUBMIT, (replica, record))
        if record.hedges_left > 0 and record.backups:
            self._push(now + record.hedge_delay_s, _HEDGE, record)

    def _submit(self, replica: _Replica, record: RequestRecord, now: float) -> None:
        if record.winner is not None and record.winner != replica.view.replica_id:
            return  # a hedge whose race was decided while it travelled: its cancel follows
        request = record.request
        engine_request = EngineRequest(
            request_id=request.request_id,
            prompt_token_ids=prompt_token_ids(request),
            max_tokens=request.output_tokens,
        )
        replica.engine.submit(engine_request, now)
        if not replica.busy:
            self._start_step(replica, now)

    def _start_step(self, replica: _Replica, now: float) -> None:
        result = replica.engine.step(now)
        stats = result.stats
        self.preemptions += stats.preemptions
        self.prefix_query_tokens += stats.prefix_queries_tokens
        self.prefix_hit_tokens += stats.prefix_hits_tokens
        if result.end_s <= now and not result.outputs:
            replica.busy = False  # nothing schedulable: wait for the next submit
            return
        replica.busy = True
        replica.window.add(result)
        self.busy_s += result.duration_s
        self._push(result.end_s, _STEP_END, (replica, result))

    def _step_end(self, replica: _Replica, result: StepResult, now: float) -> None:
        back = replica.view.rtt_s / 2
        seen = now + back
        replica_id = replica.view.replica_id
        for output in result.outputs:
            record = self._records[output.request_id]
            if record.winner is None:
                self._won(record, replica_id, seen, output.cached_tokens)
            elif record.winner != replica_id:
                self.hedge_wasted_tokens += 1  # the loser's token, made before its cancel came
                continue
            if seen <= self._window_end:
                self.window_output_tokens += 1
            if output.finished:
                record.finished_s = seen
                self._push(seen, _FINISH_SEEN, record)
        self._start_step(replica, now)

    def _won(self, record: RequestRecord, replica_id: str, seen: float, cached: int) -> None:
        """The first token of `record` came from `replica_id`: it wins; the others are
        cancelled (the router drops their connections; each engine aborts when that arrives)."""
        record.winner = record.replica_id = replica_id
        record.first_token_s = seen
        record.cached_tokens = cached
        first_token = getattr(self.strategy, "on_first_token", None)
        if first_token is not None:
            first_token(record.request, replica_id, seen)
        if record.router is not None:
            record.router.observe_ttft(record.request, seen - record.attempts[replica_id])
        for other in record.attempts:
            if other != replica_id:
                loser = self._by_id[other]
                self._push(seen + loser.view.rtt_s / 2, _CANCEL, (loser, record))

    def _cancel(self, replica: _Replica, record: RequestRecord, now: float) -> None:
        replica.engine.abort(record.request.request_id, now)
        replica.view.in_flight -= 1
        cancelled = getattr(self.strategy, "on_cancel", None)
        if cancelled is not None:
            cancelled(record.request, replica.view.replica_id, now)

    def _finish_seen(self, record: RequestRecord, now: float) -> None:
        assert record.replica_id is not None
        self._by_id[record.replica_id].view.in_flight -= 1
        self._open -= 1
        self.strategy.on_finish(record.request, record.replica_id, now, True)
        self._release(record, now)

    def _scrape(self, replica: _Replica, now: float) -> None:
        snapshot = replica.engine.snapshot()
        window, span = replica.window, now - replica.window_start_s
        view = replica.view
        gpu = None
        if self._gpu_observer is not None:
            gpu = self._gpu_reading(replica, window.busy_s / span if span > 0 else 0.0, now)
        telemetry = _Telemetry(
            replica=replica,
            scraped_s=now,
            running=snapshot.running,
            waiting=snapshot.waiting,
            kv_usage=snapshot.kv_cache_usage,
            # An empty window keeps the last mean, as a histogram's windowed mean would.
            ttft_s=window.ttft_sum / window.ttft_count if window.ttft_count else view.ttft_s,
            itl_s=window.itl_sum / window.itl_count if window.itl_count else view.itl_s,
            e2e_s=window.e2e_sum / window.e2e_count if window.e2e_count else view.e2e_s,
            prompt_tokens_per_s=window.prompt_tokens / span if span > 0 else 0.0,
            generation_tokens_per_s=window.generation_tokens / span if span > 0 else 0.0,
            gpu=gpu,
        )
        replica.window, replica.window_start_s = _Window(), now
        self._push(now + self.fleet.telemetry_delay_s, _DELIVER, telemetry)
        if self._arrivals_open or self._open or self._waiting:
            self._push(now + self.fleet.scrape_interval_s, _SCRAPE, replica)

    def _gpu_reading(self, replica: _Replica, utilization: float, now: float) -> GpuState:
        """The replica's GPU as its DCGM adapter reads it at `now` (a new version)."""
        replica.gpu_version += 1
        view = replica.view
        return gpu_state(
            view.replica_id,
            view.node,
            utilization=utilization,
            speed_factor=replica.engine.speed_factor,
            now=now,
            version=replica.gpu_version,
            gpu_name=replica.gpu_name,
        )

    def _deliver(self, telemetry: _Telemetry, now: float) -> None:
        view = telemetry.replica.view
        if telemetry.scraped_s < view.telemetry_s:
            return
        view.running, view.waiting = telemetry.running, telemetry.waiting
        view.kv_usage = telemetry.kv_usage
        view.ttft_s, view.itl_s, view.e2e_s = telemetry.ttft_s, telemetry.itl_s, telemetry.e2e_s
        view.prompt_tokens_per_s = telemetry.prompt_tokens_per_s
        view.generation_tokens_per_s = telemetry.generation_tokens_per_s
        view.telemetry_s = telemetry.scraped_s
        self.strategy.observe(view, now)
        if telemetry.gpu is not None and self._gpu_observer is not None:
            self._gpu_observer(view, telemetry.gpu, now)

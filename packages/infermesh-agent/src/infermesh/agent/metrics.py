"""The agent's Prometheus metrics: one registry, gauges read from the store at scrape time.

Per-target and per-GPU gauges are produced by a collector that walks the store when /metrics
is scraped, so writes and scoring pay nothing for them; counters are incremented by the APIs.
Gossip metrics are read from the gossip service's counters and members the same way. The
aiohttp server here serves the registry and, with gossip, `GET /gossip/members` as JSON; it
never touches scoring or gossip state otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infermesh.core.config import parse_host_port
from infermesh.core.model import GpuState, ModelState
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.gpu_health import gpu_exclusion_reason, gpu_score
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.state import StateStore

if TYPE_CHECKING:
    from infermesh.agent.gossip.node import GossipCounters, MemberInfo

__all__ = [
    "GOSSIP_DROP_REASONS",
    "GOSSIP_STATES",
    "GPU_GAUGES",
    "TARGET_GAUGES",
    "AgentMetrics",
    "GossipCollector",
    "GossipView",
    "MetricsServer",
    "members_document",
]

TARGET_LABELS = ("target_id", "model", "node", "endpoint")
GPU_LABELS = ("node", "gpu_uuid", "gpu_index", "gpu_name")

# name suffix -> (help, value); the full name is infermesh_agent_target_<suffix>.
_TargetValue = Callable[[ModelState, InflightTracker, float], float | None]
TARGET_GAUGES: dict[str, tuple[str, _TargetValue]] = {
    "running": ("Requests the runtime is running.", lambda s, i, n: s.running),
    "waiting": ("Requests queued in the runtime.", lambda s, i, n: s.waiting),
    "kv_cache_usage_ratio": ("KV-cache usage, 0..1.", lambda s, i, n: s.kv_cache_usage),
    "prefix_cache_hit_ratio": (
        "Prefix-cache hit rate reported by the runtime, 0..1.",
        lambda s, i, n: s.prefix_cache_hit_rate,
    ),
    "work_left_seconds": (
        "Expected seconds to drain what is queued and running.",
        lambda s, i, n: s.work_left_s,
    ),
    "in_flight": (
        "Open reservations started after the target's last telemetry (unseen by the runtime).",
        lambda s, i, n: i.in_flight(s.key.target_id, s.last_updated),
    ),
    "finished_unseen": (
        "Reservations the last telemetry still counted that have finished since.",
        lambda s, i, n: i.finished_unseen(s.key.target_id, s.last_updated),
    ),
    "reservations_open": (
        "All open reservations on the target.",
        lambda s, i, n: i.open_count(s.key.target_id),
    ),
    "ttft_seconds": ("Time to first token reported by the runtime.", lambda s, i, n: s.ttft_s),
    "ttft_ewma_seconds": (
        "EWMA of time to first token from the routers' outcome reports.",
        lambda s, i, n: st.ttft_ewma_s if (st := i.stats(s.key.target_id)) else None,
    ),
    "error_ratio": (
        "EWMA of the share of outcomes that failed because of the target.",
        lambda s, i, n: st.error_rate if (st := i.stats(s.key.target_id)) else 0.0,
    ),
    "healthy": ("1 when the runtime reports the target healthy.", lambda s, i, n: s.healthy),
    "loaded": ("1 when the model is loaded.", lambda s, i, n: s.loaded),
    "telemetry_age_seconds": (
        "Seconds since the target's telemetry was read.",
        lambda s, i, n: max(0.0, n - s.last_updated),
    ),
}

_GpuValue = Callable[[GpuState], float]
GPU_GAUGES: dict[str, tuple[str, _GpuValue]] = {
    "utilization_ratio": ("GPU utilisation, 0..1.", lambda g: g.utilization),
    "memory_used_bytes": ("Device memory in use.", lambda g: g.memory_used_bytes),
    "memory_total_bytes": ("Device memory in total.", lambda g: g.memory_total_bytes),
    "vram_headroom_ratio": ("Share of device memory free, 0..1.", lambda g: g.vram_headroom),
    "temperature_celsius": ("GPU temperature.", lambda g: g.temperature_c),
    "power_watts": ("Power draw.", lambda g: g.power_w),
    "healthy": (
        "1 when no fault (uncorrectable ECC, XID, row remapping) is reported; throttling is not "
        "a fault: see infermesh_agent_gpu_health_score_ratio.",
        lambda g: g.healthy,
    ),
}


class StateCollector(Collector):
    """Reads the store, tracker and engine at scrape time."""

    def __init__(
        self,
        store: StateStore,
        inflight: InflightTracker,
        engine: ScoringEngine | None,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.inflight = inflight
        self.engine = engine
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        now = self.clock()
        states = self.store.model_states()
        for suffix, (help_text, value) in TARGET_GAUGES.items():
            family = GaugeMetricFamily(
                f"infermesh_agent_target_{suffix}", help_text, labels=TARGET_LABELS
            )
            for state in states:
                number = value(state, self.inflight, now)
                if number is not None:
                    key = state.key
                    labels = [key.target_id, key.model, key.node, key.endpoint]
                    family.add_metric(labels, float(number))
            yield family
        gpus = self.store.gpu_states()
        for suffix, (help_text, gpu_value) in GPU_GAUGES.items():
            family = GaugeMetricFamily(
                f"infermesh_agent_gpu_{suffix}", help_text, labels=GPU_LABELS
            )
            for gpu in gpus:
                labels = [gpu.key.node, gpu.key.gpu_uuid, str(gpu.index), gpu.name]
                family.add_metric(labels, float(gpu_value(gpu)))
            yield family
        yield from self._gpu_health(gpus, now)
        yield from self._counters()

    def _gpu_health(self, gpus: tuple[GpuState, ...], now: float) -> Iterable[Metric]:
        """What the `gpu_health` scorer and the GPU-fault filter make of each GPU and target."""
        stale_after_s = self.engine.stale_after_s if self.engine is not None else 5.0
        score = GaugeMetricFamily(
            "infermesh_agent_gpu_health_score_ratio",
            "The gpu_health scorer's view of the GPU, 0..1 (1: cool, unthrottled, memory to "
            "spare; a replica scores as its worst GPU).",
            labels=GPU_LABELS,
        )
        throttle = GaugeMetricFamily(
            "infermesh_agent_gpu_throttle_reasons",
            "1 per active thermal or power clock-event reason of the GPU (NVML names).",
            labels=(*GPU_LABELS, "reason"),
        )
        for gpu in gpus:
            labels = [gpu.key.node, gpu.key.gpu_uuid, str(gpu.index), gpu.name]
            score.add_metric(labels, gpu_score(gpu, now, stale_after_s=stale_after_s)[0])
            for reason in gpu.throttle_reasons:
                throttle.add_metric([*labels, reason], 1.0)
        yield score
        yield throttle
        excluded = GaugeMetricFamily(
            "infermesh_agent_target_gpu_excluded",
            "1 when a fault on one of the target's GPUs keeps it from new requests, with the "
            "reason (e.g. 'GPU GPU-... unhealthy: XID 79 reported'); 0 for targets mapped to "
            "healthy GPUs.",
            labels=(*TARGET_LABELS, "reason"),
        )
        for state in self.store.model_states():
            if not state.labels.gpu_uuid:
                continue
            why = gpu_exclusion_reason(self.store.gpus_for(state))
            key = state.key
            labels = [key.target_id, key.model, key.node, key.endpoint, why or ""]
            excluded.add_metric(labels, 0.0 if why is None else 1.0)
        yield excluded

    def _counters(self) -> Iterable[Metric]:
        deltas = CounterMetricFamily(
            "infermesh_agent_deltas",
            "State deltas received, by kind and result.",
            labels=("kind", "result"),
        )
        for kind, counts in (("model", self.store.model_counts), ("gpu", self.store.gpu_counts)):
            deltas.add_metric([kind, "applied"], counts.applied)
            deltas.add_metric([kind, "stale"], counts.stale)
        yield deltas
        yield CounterMetricFamily(
            "infermesh_agent_reservations_expired",
            "Reservations dropped after their TTL without an outcome.",
            value=self.inflight.expired_total,
        )
        failures = CounterMetricFamily(
            "infermesh_agent_scorer_failures",
            "Scorer calls that raised or returned the wrong number of results.",
            labels=("scorer",),
        )
        if self.engine is not None:
            for name, count in sorted(self.engine.scorer_failures.items()):
                failures.add_metric([name], count)
        yield failures
        if self.engine is not None:
            yield from self._policy(self.engine)

    def _policy(self, engine: ScoringEngine) -> Iterable[Metric]:
        """The operator policy in force in this agent's scoring (all agents converge on one
        revision; a lagging agent still ranks with an older policy)."""
        policy = engine.policy
        yield GaugeMetricFamily(
            "infermesh_agent_policy_revision",
            "Revision of the operator policy this agent scores with (0: none applied yet).",
            value=policy.revision,
        )
        yield GaugeMetricFamily(
            "infermesh_agent_policy_drained_nodes",
            "Nodes drained by the policy this agent scores with (they get no new requests).",
            value=len(policy.drains),
        )


GOSSIP_STATES = ("alive", "suspect", "dead", "left")
# Always exported (0 until it happens) so rate() and alerts work from the first scrape; other
# reasons the gossip layer reports appear when they first occur.
GOSSIP_DROP_REASONS = ("unknown_key", "bad_seal", "malformed", "too_large", "injected_loss")


class GossipView(Protocol):
    """What the metrics read from the gossip service (`GossipService` provides it)."""

    @property
    def counters(self) -> GossipCounters: ...

    @property
    def address(self) -> str: ...

    def members(self) -> list[MemberInfo]: ...


class GossipCollector(Collector):
    """`infermesh_gossip_*`: members by state and the node's counters, read at scrape time."""

    def __init__(self, gossip: GossipView) -> None:
        self.gossip = gossip

    def collect(self) -> Iterator[Metric]:
        members = self.gossip.members()
        by_state = dict.fromkeys(GOSSIP_STATES, 0)
        for member in members:
            by_state[member.state] = by_state.get(member.state, 0) + 1
        family = GaugeMetricFamily(
            "infermesh_gossip_members",
            "Members of the gossip mesh this agent knows, by state (itself included).",
            labels=("state",),
        )
        for state, count in by_state.items():
            family.add_metric([state], count)
        yield family
        rtt = GaugeMetricFamily(
            "infermesh_gossip_member_rtt_seconds",
            "Round-trip time to a member estimated from network coordinates (Vivaldi).",
            labels=("member",),
        )
        for member in members:
            if member.rtt_s is not None:
                rtt.add_metric([member.node], member.rtt_s)
        yield rtt
        counters = self.gossip.counters
        for name, help_text, value in (
            ("probes", "Failure-detection probes this agent sent.", counters.probes),
            ("suspicions", "Times this agent suspected a member.", counters.suspicions),
            (
                "refutations",
                "Times this agent refuted a suspicion of itself.",
                counters.refutations,
            ),
        ):
            yield CounterMetricFamily(f"infermesh_gossip_{name}", help_text, value=value)
        traffic = CounterMetricFamily(
            "infermesh_gossip_bytes",
            "Gossip bytes received and sent (UDP and TCP, sealed), by direction.",
            labels=("direction",),
        )
        traffic.add_metric(["in"], counters.bytes_in)
        traffic.add_metric(["out"], counters.bytes_out)
        yield traffic
        packets = CounterMetricFamily(
            "infermesh_gossip_packets",
            "Gossip packets received and sent, by direction.",
            labels=("direction",),
        )
        packets.add_metric(["in"], counters.packets_in)
        packets.add_metric(["out"], counters.packets_out)
        yield packets
        dropped = CounterMetricFamily(
            "infermesh_gossip_packets_dropped",
            "Gossip input dropped unparsed or unanswered, by reason (unknown_key: sealed with a "
            "key this agent does not hold).",
            labels=("reason",),
        )
        reasons = {**dict.fromkeys(GOSSIP_DROP_REASONS, 0), **counters.dropped}
        for reason, count in sorted(reasons.items()):
            dropped.add_metric([reason], count)
        yield dropped


def members_document(node_id: str, gossip: GossipView) -> dict[str, Any]:
    """The JSON of `GET /gossip/members`: this node, its gossip address and every member."""
    members = []
    for member in sorted(gossip.members(), key=lambda m: m.node):
        meta = member.meta
        members.append(
            {
                "node": member.node,
                "state": member.state,
                "incarnation": member.incarnation,
                "address": member.address,
                "rtt_s": member.rtt_s,
                "roles": list(meta.roles) if meta else [],
                "zone": meta.zone if meta else "",
                "labels": dict(meta.labels) if meta else {},
                "apis": dict(meta.apis) if meta else {},
                "runtimes": list(meta.runtimes) if meta else [],
            }
        )
    return {"node": node_id, "address": gossip.address, "members": members}


class AgentMetrics:
    """The agent's registry, its counters, and the state collector."""

    def __init__(
        self,
        store: StateStore,
        inflight: InflightTracker,
        engine: ScoringEngine | None,
        clock: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        self.score_requests = Counter(
            "infermesh_agent_score_requests",
            "ScoreTargets calls by result (ok, no_targets, unknown_model, invalid).",
            ["result"],
            registry=self.registry,
        )
        self.score_duration = Histogram(
            "infermesh_agent_score_duration_seconds",
            "Time to rank targets for one ScoreTargets call (engine plus encoding).",
            buckets=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2),
            registry=self.registry,
        )
        self.admits = Counter(
            "infermesh_agent_admits",
            "Admit calls by result (admitted, rejected, invalid).",
            ["result"],
            registry=self.registry,
        )
        self.outcomes = Counter(
            "infermesh_agent_outcomes",
            "Outcomes reported by routers, by result (ok, target_error, client_error).",
            ["result"],
            registry=self.registry,
        )
        self.adapter_restarts = Counter(
            "infermesh_agent_adapter_restarts",
            "Times an adapter's delta stream ended or raised and was restarted.",
            ["adapter"],
            registry=self.registry,
        )
        self.registry.register(StateCollector(store, inflight, engine, clock))

    def attach_gossip(self, gossip: GossipView) -> None:
        """Export the `infermesh_gossip_*` metrics of this gossip service."""
        self.registry.register(GossipCollector(gossip))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsServer:
    """Serves `GET /metrics` in the Prometheus text format on `host:port`, and the gossip
    members as JSON on `GET /gossip/members` (404 when this agent does not gossip)."""

    def __init__(
        self,
        metrics: AgentMetrics,
        listen: str,
        *,
        node_id: str = "",
        gossip: GossipView | None = None,
    ) -> None:
        self.metrics = metrics
        self.node_id = node_id
        self.gossip = gossip
        try:
            self.host, self.port = parse_host_port(listen)
        except ValueError as exc:
            raise ValueError(f"agent.metrics_listen: {exc}") from None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle)
        app.router.add_get("/gossip/members", self._handle_members)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"agent.metrics_listen {self.host}:{self.port}"
            raise OSError(f"{where}: cannot listen ({exc.strerror or exc})") from exc
        self._runner = runner
        if self.port == 0 and runner.addresses:
            self.port = int(runner.addresses[0][1])

    async def _handle(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _handle_members(self, request: web.Request) -> web.Response:
        if self.gossip is None:
            body = {"error": "gossip is not enabled on this agent (set gossip.enabled = true)"}
            return web.json_response(body, status=404)
        document = members_document(self.node_id, self.gossip)
        return web.json_response(document, dumps=lambda d: json.dumps(d, indent=1))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

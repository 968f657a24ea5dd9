"""The router's Prometheus metrics, `infermesh_router_*`, in one registry per process.

Label children for the known routes are bound once so the request path does no label lookups
for them. Only definitions and cheap recording helpers; never starts an HTTP server.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from infermesh.core.scoring.inflight import InflightTracker
from infermesh.router.replica import StateReplica

__all__ = ["CONTENT_TYPE", "RouterMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Seconds; fine at the low end, where the router's own overhead and fast TTFTs live.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
AGENT_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
ROUTES = ("chat", "completions", "models", "health", "metrics", "other")
FORWARDED_ROUTES = ("chat", "completions")


class RouterMetrics:
    """Every router metric; `render()` gives the Prometheus text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "infermesh_router_requests",
            "Requests answered by the router, by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.in_progress = Gauge(
            "infermesh_router_requests_in_progress",
            "Requests being handled now, by route.",
            ["route"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "infermesh_router_upstream_latency_seconds",
            "From sending a request to a runtime until its response ended, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.ttft = Histogram(
            "infermesh_router_ttft_seconds",
            "Streamed requests: from arrival at the router to the first body chunk of the runtime.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.agent_score_latency = Histogram(
            "infermesh_router_agent_score_latency_seconds",
            "Duration of ScoreTargets calls to the local agent (router.scoring = agent).",
            buckets=AGENT_BUCKETS_S,
            registry=r,
        )
        self.local_score_latency = Histogram(
            "infermesh_router_local_score_latency_seconds",
            "Duration of ranking a request in the router (router.scoring = local).",
            buckets=AGENT_BUCKETS_S,
            registry=r,
        )
        self.upstream_failures = Counter(
            "infermesh_router_upstream_failures",
            "Attempts that failed before anything was relayed (then retried, or answered 502).",
            ["route"],
            registry=r,
        )
        self.midstream_failures = Counter(
            "infermesh_router_upstream_midstream_failures",
            "Responses whose runtime failed after part of the body was relayed.",
            ["route"],
            registry=r,
        )
        self.outcomes_dropped = Counter(
            "infermesh_router_outcomes_dropped",
            "Outcome reports that could not be delivered to the agent.",
            registry=r,
        )
        self.in_progress_by_route = {route: self.in_progress.labels(route) for route in ROUTES}
        self.upstream_latency_by_route = {
            route: self.upstream_latency.labels(route) for route in FORWARDED_ROUTES
        }
        self.ttft_by_route = {route: self.ttft.labels(route) for route in FORWARDED_ROUTES}
        self._requests_children: dict[tuple[str, int], Counter] = {}

    def watch_replica(self, replica: StateReplica, inflight: InflightTracker) -> None:
        """Export local scoring's replica and reservations, read when scraped."""
        self.registry.register(_ReplicaCollector(replica, inflight))

    def count_request(self, route: str, status: int) -> None:
        child = self._requests_children.get((route, status))
        if child is None:
            child = self._requests_children[(route, status)] = self.requests.labels(
                route, str(status)
            )
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ReplicaCollector(Collector):
    """The state replica's health and size, and the router's own reservations."""

    def __init__(self, replica: StateReplica, inflight: InflightTracker) -> None:
        self.replica = replica
        self.inflight = inflight

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        replica = self.replica
        yield GaugeMetricFamily(
            "infermesh_router_state_connected",
            "1 while the agent's state streams are open and their snapshot is complete.",
            value=1.0 if replica.connected else 0.0,
        )
        live = replica.live
        yield GaugeMetricFamily(
            "infermesh_router_state_targets",
            "Targets in the replica of the agent's state that requests are ranked on.",
            value=len(live.model_states()) if live is not None else 0,
        )
        yield CounterMetricFamily(
            "infermesh_router_state_syncs",
            "Complete snapshots of the agent's state received (first sync and resyncs).",
            value=replica.syncs,
        )
        yield CounterMetricFamily(
            "infermesh_router_state_deltas",
            "Model and GPU deltas received from the agent's watch streams.",
            value=replica.deltas,
        )
        yield GaugeMetricFamily(
            "infermesh_router_reservations_open",
            "In-flight reservations this router holds (released by each attempt's outcome).",
            value=self.inflight.open_count(),
        )

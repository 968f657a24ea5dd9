"""The router's Prometheus metrics, `infermesh_router_*`, in one registry per process.

What every request records (request counts, in-progress, latency histograms) lives in plain
slotted objects, read by a collector when `/metrics` is scraped: recording one is an integer
add and a bisect, with no lock and no label lookup (prometheus_client's own metrics take a lock
per update, which the single-threaded event loop does not need). Rare events use
prometheus_client counters. Only definitions and cheap recording helpers; never starts an HTTP
server.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from infermesh.core.scoring.inflight import InflightTracker
from infermesh.router.replica import StateReplica

__all__ = ["CONTENT_TYPE", "HEDGE_EVENTS", "FastHistogram", "LevelGauge", "RouterMetrics"]

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
# Seconds between streamed chunks: decode steps are milliseconds to tens of milliseconds.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 5.0)
MAX_MODEL_LABELS = 64
"""Distinct `model` label values; further models are counted as `other`."""
MAX_TARGET_LABELS = 512
"""Distinct `target` label values; further targets are counted as `other`."""
HEDGE_EVENTS = ("fired", "won", "cancelled", "denied_by_budget", "denied_saturated")
ROUTES = ("chat", "completions", "embeddings", "ws", "models", "health", "metrics", "other")
FORWARDED_ROUTES = ("chat", "completions", "embeddings")


class FastHistogram:
    """A histogram for one event loop: `observe` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are `le` (upper bound inclusive): bisect_left puts a value equal
        # to a bound in that bound's bucket.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


class LevelGauge:
    """A gauge of things in progress: `inc` and `dec` are adds."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


class RouterMetrics:
    """Every router metric; `render()` gives the Prometheus text exposition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
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
        self.requests_by_route_status: dict[tuple[str, int], int] = {}
        self.in_progress_by_route = {route: LevelGauge() for route in ROUTES}
        self.upstream_latency_by_route = {
            route: FastHistogram(LATENCY_BUCKETS_S) for route in FORWARDED_ROUTES
        }
        self.ttft_by_route = {route: FastHistogram(LATENCY_BUCKETS_S) for route in FORWARDED_ROUTES}
        self.agent_score_latency = FastHistogram(AGENT_BUCKETS_S)
        self.local_score_latency = FastHistogram(AGENT_BUCKETS_S)
        # Per model and SLO class (bounded: MAX_MODEL_LABELS models, then `other`).
        self.ttft_by_model: dict[tuple[str, str], FastHistogram] = {}
        self.itl_by_model: dict[tuple[str, str], FastHistogram] = {}
        self.e2e_by_model: dict[tuple[str, str], FastHistogram] = {}
        self.outcomes: dict[tuple[str, str, str], int] = {}
        self.target_choices: dict[str, int] = {}
        self.retries: dict[str, int] = {}
        self.retries_denied = 0
        self.hedges = dict.fromkeys(HEDGE_EVENTS, 0)
        self._models: set[str] = set()
        self.breaker_transitions = Counter(
            "infermesh_router_breaker_transitions",
            "Circuit-breaker state changes of a target (to_state: open, half_open, closed).",
            ["target", "to_state"],
            registry=r,
        )
        r.register(_RequestCollector(self))

    def watch_replica(self, replica: StateReplica, inflight: InflightTracker) -> None:
        """Export local scoring's replica and reservations, read when scraped."""
        self.registry.register(_ReplicaCollector(replica, inflight))

    def count_request(self, route: str, status: int) -> None:
        counts = self.requests_by_route_status
        key = (route, status)
        counts[key] = counts.get(key, 0) + 1

    def model_label(self, model: str) -> str:
        """`model` as a label value: the first MAX_MODEL_LABELS models served, then `other`.

        Call only with models the mesh serves (the scoring mode knew them), never raw input.
        """
        models = self._models
        if model in models:
            return model
        if len(models) < MAX_MODEL_LABELS:
            models.add(model)
            return model
        return "other"

    def histograms(
        self, key: tuple[str, str]
    ) -> tuple[FastHistogram, FastHistogram, FastHistogram]:
        """TTFT, inter-token latency and e2e histograms of (model label, SLO class)."""
        ttft = self.ttft_by_model.get(key)
        if ttft is None:
            ttft = self.ttft_by_model[key] = FastHistogram(LATENCY_BUCKETS_S)
            self.itl_by_model[key] = FastHistogram(ITL_BUCKETS_S)
            self.e2e_by_model[key] = FastHistogram(LATENCY_BUCKETS_S)
        return ttft, self.itl_by_model[key], self.e2e_by_model[key]

    def count_outcome(self, model: str, slo_class: str, outcome: str) -> None:
        key = (model, slo_class, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def count_choice(self, target: str) -> None:
        choices = self.target_choices
        if target not in choices and len(choices) >= MAX_TARGET_LABELS:
            target = "other"
        choices[target] = choices.get(target, 0) + 1

    def count_retry(self, reason: str) -> None:
        self.retries[reason] = self.retries.get(reason, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _model_histogram(
    name: str, documentation: str, by_key: dict[tuple[str, str], FastHistogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["model", "slo_class"])
    for (model, slo_class), histogram in sorted(by_key.items()):
        family.add_metric([model, slo_class], histogram.cumulative(), histogram.sum)
    return family


def _counter(
    name: str, documentation: str, labels: Sequence[str], counts: dict[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=list(labels))
    for key, count in sorted(counts.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


def _histogram(
    name: str, documentation: str, by_label: dict[str, FastHistogram], label: str = "route"
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
    for value, histogram in by_label.items():
        family.add_metric([value] if label else [], histogram.cumulative(), histogram.sum)
    return family


class _RequestCollector(Collector):
    """The per-request metrics of `RouterMetrics`, as Prometheus families."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "infermesh_router_requests",
            "Requests answered by the router, by route and HTTP status.",
            labels=["route", "status"],
        )
        for (route, status), count in sorted(m.requests_by_route_status.items()):
            requests.add_metric([route, str(status)], count)
        yield requests
        in_progress = GaugeMetricFamily(
            "infermesh_router_requests_in_progress",
            "Requests being handled now, by route.",
            labels=["route"],
        )
        for route, gauge in m.in_progress_by_route.items():
            in_progress.add_metric([route], gauge.value)
        yield in_progress
        yield _histogram(
            "infermesh_router_upstream_latency_seconds",
            "From sending a request to a runtime until its response ended, by route.",
            m.upstream_latency_by_route,
        )
        yield _histogram(
            "infermesh_router_ttft_seconds",
            "Streamed requests: from arrival at the router to the first body chunk of the runtime.",
            m.ttft_by_route,
        )
        yield _histogram(
            "infermesh_router_agent_score_latency_seconds",
            "Duration of ScoreTargets calls to the local agent (router.scoring = agent).",
            {"": m.agent_score_latency},
            label="",
        )
        yield _histogram(
            "infermesh_router_local_score_latency_seconds",
            "Duration of ranking a request in the router (router.scoring = local).",
            {"": m.local_score_latency},
            label="",
        )
        yield _model_histogram(
            "infermesh_router_time_to_first_token_seconds",
            "From arrival at the router to the first response byte relayed (streams: the first "
            "token), by model and SLO class.",
            m.ttft_by_model,
        )
        yield _model_histogram(
            "infermesh_router_inter_token_latency_seconds",
            "Gaps between relayed chunks of streamed responses, by model and SLO class.",
            m.itl_by_model,
        )
        yield _model_histogram(
            "infermesh_router_e2e_latency_seconds",
            "From arrival at the router to the end of the response, by model and SLO class.",
            m.e2e_by_model,
        )
        yield _counter(
            "infermesh_router_outcomes",
            "Forwarded requests by how they ended: ok, client_error, rate_limited, "
            "upstream_failed, midstream_failure, client_disconnected, no_target, unknown_model, "
            "agent_unavailable.",
            ("model", "slo_class", "outcome"),
            m.outcomes,
        )
        yield _counter(
            "infermesh_router_target_choices",
            "Requests answered by each target (the attempt whose response was relayed).",
            ("target",),
            m.target_choices,
        )
        yield _counter(
            "infermesh_router_retries",
            "Attempts sent to another target after one failed before its first byte, by the "
            "failure (connect, http_5xx, http_429).",
            ("reason",),
            m.retries,
        )
        yield CounterMetricFamily(
            "infermesh_router_retries_denied",
            "Retries not sent because the retry budget was spent ([router.retries]).",
            value=m.retries_denied,
        )
        yield _counter(
            "infermesh_router_hedges",
            "Hedged attempts: fired, won (its response was relayed), cancelled (lost the race "
            "and was aborted upstream), denied_by_budget, denied_saturated.",
            ("event",),
            m.hedges,
        )


class _ReplicaCollector(Collector):
    """The state replica's health and size, and the router's own reservations."""

    def __init__(self, replica: StateReplica, inflight: InflightTracker) -> None:
        self.replica = replica
        self.inflight = inflight

    def collect(self) -> Iterator[Metric]:
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

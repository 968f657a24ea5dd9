"""Metrics of the KServe v2 ingress, on the router's registry: calls by protocol, call and result.

`infermesh_router_kserve_requests_total{protocol, call, result}` counts what each client got
(HTTP status or gRPC code name); `infermesh_router_kserve_upstream_latency_seconds` times the
forwarded calls by protocol and call. Definitions only; never decides anything.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from infermesh.router.metrics import RouterMetrics

__all__ = ["KServeMetrics"]

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class KServeMetrics:
    """The KServe ingress metrics, registered once on `metrics.registry`."""

    def __init__(self, metrics: RouterMetrics) -> None:
        registry = metrics.registry
        self.requests = Counter(
            "infermesh_router_kserve_requests",
            "KServe v2 calls answered by the router, by protocol (http, grpc), call and result "
            "(HTTP status or gRPC status code).",
            ["protocol", "call", "result"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "infermesh_router_kserve_upstream_latency_seconds",
            "KServe v2 calls forwarded to Triton: from sending to the end of the response.",
            ["protocol", "call"],
            buckets=_BUCKETS_S,
            registry=registry,
        )

    def count(self, protocol: str, call: str, result: str) -> None:
        self.requests.labels(protocol, call, result).inc()

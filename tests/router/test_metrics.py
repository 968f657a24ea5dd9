"""The router's metrics as Prometheus reads them: counts, in-progress levels and histograms
recorded on the hot path without prometheus_client locks, exposed in the standard format."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.router.metrics import FastHistogram, RouterMetrics


def samples(metrics: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_value_on_a_bucket_bound_counts_in_that_bucket() -> None:
    histogram = FastHistogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.005, 0.5):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert histogram.sum == pytest.approx(0.5065)


def test_requests_levels_and_latencies_are_exposed_with_their_labels() -> None:
    metrics = RouterMetrics()
    metrics.count_request("chat", 200)
    metrics.count_request("chat", 200)
    metrics.count_request("completions", 503)
    metrics.in_progress_by_route["chat"].inc()
    metrics.upstream_latency_by_route["chat"].observe(0.002)
    metrics.local_score_latency.observe(0.00005)
    found = samples(metrics)
    chat_200 = (("route", "chat"), ("status", "200"))
    assert found[("infermesh_router_requests_total", chat_200)] == 2
    completions_503 = (("route", "completions"), ("status", "503"))
    assert found[("infermesh_router_requests_total", completions_503)] == 1
    assert found[("infermesh_router_requests_in_progress", (("route", "chat"),))] == 1
    le = (("le", "0.0025"), ("route", "chat"))
    assert found[("infermesh_router_upstream_latency_seconds_bucket", le)] == 1
    assert found[("infermesh_router_upstream_latency_seconds_count", (("route", "chat"),))] == 1
    assert found[("infermesh_router_local_score_latency_seconds_count", ())] == 1
    assert found[("infermesh_router_agent_score_latency_seconds_count", ())] == 0

"""The Grafana dashboard and docs/observability.md name only metrics a live mesh exports.

A real mesh (emulated vLLM and dcgm-exporter, agent with gossip, router) serves a few requests
through the openai client; every PromQL expression of examples/grafana/infermesh-dashboard.json
and every metric documented in docs/observability.md is checked against the families of the
agent's and the router's live `/metrics`. Families come from the `# TYPE` lines, which
prometheus_client writes for every registered family before its first sample, so series that
need an event (a hedge, a shed, a breaker trip) count without triggering it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from infermesh.dev.harness import GossipSpec, LocalMesh, ReplicaSpec

from .conftest import MODEL, spec
from .dashboard_support import (
    OBSERVABILITY,
    PROMETHEUS_SERIES,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    documented_metrics,
    exported_families,
    family_of,
    load_dashboard,
    promql_metric_names,
    sample_labels,
    series_labels,
    unexported,
    unknown_labels,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# ---------------------------------------------------------------------- the extractor


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.95, sum by (le, model) (rate(infermesh_router_e2e_latency"
            '_seconds_bucket{model=~"$model", le!="+Inf"}[$__rate_interval])))',
            {"infermesh_router_e2e_latency_seconds_bucket"},
        ),
        ("a / on (instance) group_left (node, gpu) b", {"a", "b"}),
        ("count(x == 0) or vector(0)", {"x"}),
        ("sum without (instance) (rate(c_total[5m] offset 1h)) > 1e3", {"c_total"}),
        ('label_replace(up, "dst", "$1", "src", "(.*){")', {"up"}),
        ('{__name__="by_name", job="x"} and on() ${other}', {"by_name"}),
        ("max_over_time(g[1h30m:1m]) unless bool h", {"g", "h"}),
        ("topk(5, sum by (le)(m))", {"m"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ('rate(foo{a="b"[5m])', "unbalanced ')' at offset 18"),
        ("rate(foo[$__rate_interval]}", "unbalanced '}' at offset 26"),
        ('foo{a="b}', "unterminated string literal at offset 6"),
        ("sum(rate(foo[5m])", "unclosed '(' at offset 3"),
    ],
)
def test_a_malformed_expression_is_refused_with_where(expr: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        promql_metric_names(expr)


def test_family_of_maps_series_suffixes() -> None:
    families = {"h_seconds": "histogram", "c_total": "counter", "g": "gauge"}
    assert family_of("h_seconds_bucket", families) == "h_seconds"
    assert family_of("h_seconds_count", families) == "h_seconds"
    assert family_of("c_total", families) == "c_total"
    assert family_of("c", families) == "c_total"
    assert family_of("g", families) == "g"
    assert family_of("g_count", families) is None
    assert family_of("nope", families) is None


def test_a_dashboard_naming_an_unexported_metric_is_reported() -> None:
    dashboard = {
        "templating": {"list": [{"type": "query", "name": "node", "query": "label_values(v, n)"}]},
        "panels": [
            {
                "title": "p",
                "panels": [
                    {"title": "q", "targets": [{"refId": "A", "expr": "rate(x_total[1m]) / y"}]}
                ],
            }
        ],
    }
    families = {"x_total": "counter", "v": "gauge"}
    assert unexported(dashboard, families) == ["panel 'q' (A): y"]


# ---------------------------------------------------------------------- the dashboard file


def test_the_dashboard_is_importable_and_covers_every_area() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert {"node", "model"} <= set(variables)
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for area in (
        "Routing",
        "Streaming",
        "Hedging",
        "Admission",
        "Retries",
        "Gossip",
        "Policy",
        "GPU",
        "Runtimes",
    ):
        assert any(area in row for row in rows), f"no row for {area}: {rows}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
            assert panel["targets"], panel["title"]
    expressions = list(dashboard_expressions(dashboard))
    assert len(expressions) > 50
    for where, expr in expressions:
        assert promql_metric_names(expr), f"{where} selects no metric: {expr}"


# ---------------------------------------------------------------------- against a live mesh


@pytest.fixture(scope="module")
async def expositions() -> AsyncIterator[dict[str, str]]:
    """The agent's and the router's /metrics of a mesh that served a few requests."""
    mesh_spec = spec(ReplicaSpec("h100", "fast"), dcgm=True, gossip=GossipSpec())
    async with LocalMesh(mesh_spec) as mesh:
        client = openai.AsyncOpenAI(base_url=f"{mesh.router_url}/v1", api_key="unused")
        try:
            messages: Any = [{"role": "user", "content": "hello"}]
            await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=4, stream=True
            )
            async for _chunk in stream:
                pass
            await client.completions.create(model=MODEL, prompt="hi", max_tokens=4)
        finally:
            await client.close()
        pages = {}
        async with aiohttp.ClientSession() as session:
            for name, url in (
                ("agent", mesh.agent_metrics_url),
                ("router", f"{mesh.router_url}/metrics"),
            ):
                async with session.get(url) as resp:
                    assert resp.status == 200, url
                    pages[name] = await resp.text()
        yield pages


def live_families(expositions: dict[str, str]) -> dict[str, str]:
    families: dict[str, str] = {}
    for page in expositions.values():
        families.update(exported_families(page))
    return families


async def test_every_dashboard_metric_is_exported_by_a_live_mesh(
    expositions: dict[str, str],
) -> None:
    families = live_families(expositions)
    assert "infermesh_gossip_members" in families  # gossip on
    assert "infermesh_agent_gpu_healthy" in families  # the dcgm emulator read
    assert re.search(
        r'^infermesh_router_requests_total\{route="chat",status="200"\} 2\.0$',
        expositions["router"],
        re.M,
    )
    missing = unexported(load_dashboard(), families)
    assert not missing, "the dashboard uses metrics the code does not export:\n" + "\n".join(
        missing
    )


async def test_docs_list_every_exported_metric_with_its_type_and_labels(
    expositions: dict[str, str],
) -> None:
    families = {
        name: kind
        for name, kind in live_families(expositions).items()
        if not name.endswith("_created")  # prometheus_client's creation timestamps
    }
    documented = documented_metrics(OBSERVABILITY.read_text())
    undocumented = sorted(set(families) - set(documented))
    assert not undocumented, f"exported but not in {OBSERVABILITY.name}: {undocumented}"
    stale = sorted(set(documented) - set(families))
    assert not stale, f"in {OBSERVABILITY.name} but not exported: {stale}"
    wrong_type = {n: (documented[n][0], k) for n, k in families.items() if documented[n][0] != k}
    assert not wrong_type, f"documented type differs from the exported one: {wrong_type}"
    seen: dict[str, set[str]] = {}
    for page in expositions.values():
        for family, labels in sample_labels(page).items():
            seen.setdefault(family, set()).update(labels)
    wrong_labels = {
        name: (sorted(documented[name][1]), sorted(labels))
        for name, labels in seen.items()
        if name in documented and not labels <= documented[name][1]
    }
    assert not wrong_labels, f"labels on samples that the docs don't list: {wrong_labels}"


async def test_every_alert_in_the_docs_uses_exported_metrics(expositions: dict[str, str]) -> None:
    families = live_families(expositions)
    alerts = list(alert_expressions(alert_rules(OBSERVABILITY.read_text())))
    assert len(alerts) >= 10
    missing = [
        f"{alert}: {name}"
        for alert, expr in alerts
        for name in sorted(promql_metric_names(expr) - PROMETHEUS_SERIES)
        if family_of(name, families) is None
    ]
    assert not missing, "alerts in the docs use metrics the code does not export:\n" + "\n".join(
        missing
    )


def test_alert_expressions_are_read_from_one_and_several_lines() -> None:
    rules = """groups:
  - name: g
    rules:
      - alert: One
        expr: a > 1
        for: 1m
      - alert: Two
        expr: |
          sum(b)
            / sum(c)
        for: 2m
"""
    assert list(alert_expressions(rules)) == [("One", "a > 1"), ("Two", "sum(b) / sum(c)")]
    with pytest.raises(ValueError, match="the alert rules"):
        alert_rules("```yaml\nfoo: 1\n```\n")


def test_dashboard_and_alerts_use_only_labels_their_metrics_carry() -> None:
    labels_of = series_labels(documented_metrics(OBSERVABILITY.read_text()))
    labels_of["up"] = frozenset()
    expressions = [*dashboard_expressions(load_dashboard())]
    expressions += alert_expressions(alert_rules(OBSERVABILITY.read_text()))
    problems = [
        f"{where}: {problem}"
        for where, expr in expressions
        for problem in unknown_labels(expr, labels_of)
    ]
    assert not problems, "labels the metrics don't have:\n" + "\n".join(problems)


def test_an_unknown_label_is_reported() -> None:
    labels_of = {"m_bucket": frozenset({"model", "le"}), "g": frozenset({"node"})}
    expr = 'sum by (le, modle) (rate(m_bucket{model=~"$model", nod="x"}[5m])) / on (node) g'
    assert unknown_labels(expr, labels_of) == [
        "m_bucket has no label 'nod'",
        "no metric in the expression has the label 'modle'",
    ]

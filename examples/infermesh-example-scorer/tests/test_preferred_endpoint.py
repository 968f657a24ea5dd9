"""The example scorer prefers listed endpoints and is found through its entry point."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from infermesh.core.contracts import TargetView
from infermesh.core.model import ModelState, RequestFeatures, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh_example_scorer.plugin import ENV_PREFERRED, PreferredEndpointScorer


def view(endpoint: str) -> TargetView:
    return TargetView(state=ModelState(key=TargetKey("m", "n", endpoint)))


def test_preferred_endpoint_scores_one_and_others_zero() -> None:
    scorer = PreferredEndpointScorer(["http://a:1/"])
    results = scorer.score(RequestFeatures(model="m"), [view("http://a:1"), view("http://b:2")])
    assert [r.score for r in results] == [1.0, 0.0]
    assert "preferred" in results[0].reason


def test_plugin_registers_scorer_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFERRED, "http://b:2")
    ep = EntryPoint("example-scorer", "infermesh_example_scorer.plugin", "infermesh")
    host = PluginHost.load(entry_point_list=[ep])
    scorer = host.scorers()["preferred-endpoint"]
    results = scorer.score(RequestFeatures(model="m"), [view("http://a:1"), view("http://b:2")])
    assert [r.score for r in results] == [0.0, 1.0]

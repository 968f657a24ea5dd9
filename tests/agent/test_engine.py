"""The scoring engine: filters, weighted built-in scorers, ranking, reasons and feedback."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from infermesh.core import builtin as core_plugin
from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import Scorer, ScoreResult, TargetView
from infermesh.core.model import (
    GpuKey,
    GpuStateDelta,
    Labels,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.plugins import PluginHost
from infermesh.core.scoring.engine import (
    RETRY_TRANSIENT_S,
    RETRY_UNAVAILABLE_S,
    Ranking,
    ScoringEngine,
    ScoringSetupError,
    resolve_scorers,
)
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

NOW = 1_000.0
MODEL = "llama"


def key(name: str, model: str = MODEL) -> TargetKey:
    return TargetKey(model=model, node=name, endpoint=f"http://{name}:8000")


class Mesh:
    """A store, a tracker and an engine with the built-in scorers, at virtual time NOW."""

    def __init__(self, scorers: Sequence[Scorer] | None = None, **scoring: Any) -> None:
        self.store = StateStore()
        self.inflight = InflightTracker(id_prefix="t")
        registered = {s.name: s for s in (builtin_scorers() if scorers is None else scorers)}
        self.engine = ScoringEngine.from_config(
            self.store, self.inflight, registered, ScoringConfig(**scoring)
        )
        self._versions: dict[TargetKey, int] = {}

    def put(self, target: TargetKey, **changes: Any) -> None:
        version = self._versions.get(target, 0) + 1
        self._versions[target] = version
        changes.setdefault("last_updated", NOW)
        self.store.apply_model_delta(ModelStateDelta(target, version, changes))

    def rank(self, prefix_key: int = 0, now: float = NOW, **features: Any) -> Ranking:
        features.setdefault("model", MODEL)
        return self.engine.rank(RequestFeatures(prefix_key=prefix_key, **features), now)


def ids(ranking: Ranking) -> list[str]:
    return [t.state.key.node for t in ranking.targets]


def test_a_saturated_replica_ranks_below_idle_ones() -> None:
    mesh = Mesh()
    mesh.put(key("a"), running=256, waiting=40, kv_cache_usage=0.97, e2e_s=8.0)
    mesh.put(key("b"), running=0, waiting=0, kv_cache_usage=0.05, e2e_s=8.0)
    mesh.put(key("c"), running=1, waiting=0, kv_cache_usage=0.10, e2e_s=8.0)
    ranking = mesh.rank()
    assert ids(ranking)[-1] == "a"
    scores = {t.state.key.node: t.score for t in ranking.targets}
    assert scores["a"] < scores["c"] < scores["b"]
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_every_ranked_target_carries_one_reason_per_scorer_with_its_weight() -> None:
    mesh = Mesh()
    mesh.put(key("a"), running=2, waiting=1, kv_cache_usage=0.5)
    (target,) = mesh.rank().targets
    reasons = {r.scorer: r for r in target.reasons}
    assert set(reasons) == {"queue", "kv", "prefix", "net_penalty", "gpu_health"}
    weights = {name: reason.weight for name, reason in reasons.items()}
    assert weights == {"queue": 2, "kv": 1, "prefix": 3, "net_penalty": 1, "gpu_health": 2}
    assert "running 2, waiting 1" in reasons["queue"].reason
    assert reasons["kv"].reason == "KV cache 50% used"
    assert reasons["prefix"].score == 0.5
    assert reasons["net_penalty"].score == 1.0  # no RTT estimator: every target counts as local
    assert reasons["gpu_health"].reason == "no GPU telemetry"
    weighted = sum(r.score * r.weight for r in target.reasons) / 9
    assert target.score == pytest.approx(weighted)


def test_reservations_steer_the_next_request_to_another_idle_replica() -> None:
    mesh = Mesh()
    mesh.put(key("a"))
    mesh.put(key("b"))
    first = mesh.rank().targets[0]
    mesh.inflight.reserve(first.target_id, now=NOW + 0.1)
    second = mesh.rank(now=NOW + 0.2).targets[0]
    assert second.target_id != first.target_id
    assert first.target_id in {t.target_id for t in mesh.rank(now=NOW + 0.2).targets}


def test_reservations_older_than_the_telemetry_are_not_counted_twice() -> None:
    mesh = Mesh()
    mesh.put(key("a"), last_updated=NOW)
    mesh.inflight.reserve(key("a").target_id, now=NOW - 1.0)  # the scrape already saw it
    (target,) = mesh.rank().targets
    assert target.view.in_flight == 0


def test_shared_prefix_sticks_to_one_replica_until_it_is_loaded_then_spills() -> None:
    mesh = Mesh()
    names = ["a", "b", "c", "d"]
    for name in names:
        mesh.put(key(name), running=2, e2e_s=1.0)
    prefix = 0x5EED
    home = ids(mesh.rank(prefix))[0]  # a new prefix: wherever the other scorers send it
    assert all(ids(mesh.rank(prefix))[0] == home for _ in range(5))
    # moderately busier than the rest: still under capacity ceil(1.25 * (9 + 1) / 4) = 4
    mesh.put(key(home), running=3, e2e_s=1.0)
    assert ids(mesh.rank(prefix))[0] == home
    # loaded past the bound: the prefix spills to another replica, which becomes a home too
    mesh.put(key(home), running=2, waiting=10, e2e_s=1.0)
    spilled = mesh.rank(prefix)
    second = ids(spilled)[0]
    assert second != home
    reasons = {r.scorer: r.reason for r in spilled.targets[0].reasons}
    # every home is loaded: the others score as for a never-seen prompt
    assert reasons["prefix"] == "every replica that got this prefix recently is loaded: neutral"
    # load gone: the prefix stays on its homes
    mesh.put(key(home), running=2, e2e_s=1.0)
    assert ids(mesh.rank(prefix))[0] in {home, second}


def test_new_prefixes_go_to_the_least_loaded_replicas() -> None:
    mesh = Mesh()
    for name in ["a", "b", "c", "d"]:
        mesh.put(key(name), e2e_s=1.0)
    homes: set[str] = set()
    for prefix in range(1, 41):
        target = ids(mesh.rank(prefix))[0]
        mesh.inflight.reserve(key(target).target_id, NOW)
        homes.add(target)
    assert len(homes) == 4


def test_without_a_prefix_key_prefix_affinity_is_neutral() -> None:
    mesh = Mesh()
    mesh.put(key("a"))
    mesh.put(key("b"))
    for target in mesh.rank(prefix_key=0).targets:
        (prefix,) = [r for r in target.reasons if r.scorer == "prefix"]
        assert prefix.score == 0.5


@pytest.mark.parametrize(
    ("changes", "why", "retry_after_s"),
    [
        ({"loaded": False}, "model not loaded", RETRY_UNAVAILABLE_S),
        ({"warming": True}, "warming up", RETRY_TRANSIENT_S),
        (
            {"healthy": False, "health_reason": "GET /health: 503"},
            "unhealthy: GET /health: 503",
            RETRY_UNAVAILABLE_S,
        ),
        ({"last_updated": NOW - 60.0}, "telemetry 60.0s old (stale after 5s)", RETRY_TRANSIENT_S),
    ],
)
def test_filtered_targets_are_listed_with_why_and_a_retry_hint(
    changes: dict[str, Any], why: str, retry_after_s: float
) -> None:
    mesh = Mesh()
    mesh.put(key("a"), **changes)
    ranking = mesh.rank()
    assert ranking.targets == ()
    assert ranking.model_known
    assert ranking.candidates == 1
    assert [str(e) for e in ranking.excluded] == [f"{key('a').target_id}: {why}"]
    assert ranking.retry_after_s == retry_after_s


def test_label_filters_select_targets() -> None:
    mesh = Mesh()
    mesh.put(key("a"), labels=Labels(zone="eu"))
    mesh.put(key("b"), labels=Labels(zone="us", custom={"tier": "gold"}))
    assert ids(mesh.rank(filters={"zone": "us"})) == ["b"]
    assert ids(mesh.rank(filters={"tier": "gold", "node": "b"})) == ["b"]
    ranking = mesh.rank(filters={"zone": "ap"})
    assert ranking.targets == ()
    assert "label zone=eu does not match filter zone=ap" in str(ranking.excluded[0])


def test_a_target_on_an_unhealthy_gpu_is_filtered() -> None:
    mesh = Mesh()
    mesh.store.apply_gpu_delta(GpuStateDelta(GpuKey("a", "GPU-0"), 1, {"xid_last": 79}))
    mesh.put(key("a"), labels=Labels(gpu_uuid="GPU-0"))
    ranking = mesh.rank()
    assert "GPU GPU-0 unhealthy: XID 79 reported" in str(ranking.excluded[0])


def test_an_unknown_model_is_reported_as_unknown() -> None:
    mesh = Mesh()
    mesh.put(key("a"))
    ranking = mesh.rank(model="mistral")
    assert not ranking.model_known
    assert ranking.targets == ()


def test_ties_are_broken_by_target_id_and_max_targets_truncates() -> None:
    mesh = Mesh()
    for name in ["c", "a", "b"]:
        mesh.put(key(name))
    assert ids(mesh.rank()) == ["a", "b", "c"]
    assert ids(mesh.engine.rank(RequestFeatures(model=MODEL), NOW, max_targets=2)) == ["a", "b"]


def test_outcome_feedback_reaches_the_scorers_view() -> None:
    seen: list[TargetView] = []

    class Spy:
        name = "spy"
        default_weight = 1.0

        def score(
            self, request: RequestFeatures, targets: Sequence[TargetView]
        ) -> list[ScoreResult]:
            seen.extend(targets)
            return [ScoreResult(0.5, "spy") for _ in targets]

    mesh = Mesh(scorers=[Spy()])
    mesh.put(key("a"))
    mesh.inflight.record_outcome(key("a").target_id, ok=False, status=502, ttft_s=0.25)
    mesh.rank()
    assert seen[0].ttft_ewma_s == 0.25
    assert seen[0].error_rate == pytest.approx(0.2)
    assert seen[0].now == NOW


def test_a_failing_scorer_counts_as_neutral_and_is_counted() -> None:
    class Broken:
        name = "broken"
        default_weight = 1.0

        def score(
            self, request: RequestFeatures, targets: Sequence[TargetView]
        ) -> list[ScoreResult]:
            raise RuntimeError("boom")

    mesh = Mesh(scorers=[Broken()])
    mesh.put(key("a"))
    (target,) = mesh.rank().targets
    assert target.score == 0.5
    assert "scorer failed (RuntimeError: boom)" in target.reasons[0].reason
    assert mesh.engine.scorer_failures == {"broken": 1}


def test_weights_come_from_config_and_zero_disables_a_scorer() -> None:
    mesh = Mesh(weights={"prefix": 0.0, "kv": 4.0})
    mesh.put(key("a"))
    (target,) = mesh.rank().targets
    assert {r.scorer: r.weight for r in target.reasons} == {
        "kv": 4.0,
        "queue": 2.0,
        "net_penalty": 1.0,
        "gpu_health": 2.0,
    }


def test_an_unknown_weight_name_is_a_clear_startup_error() -> None:
    registered = {s.name: s for s in builtin_scorers()}
    with pytest.raises(
        ScoringSetupError,
        match=r"unknown scorer\(s\) 'qeue'.*gpu_health, kv, net_penalty, prefix, queue",
    ):
        resolve_scorers(registered, ScoringConfig(weights={"qeue": 1.0}))


@pytest.mark.parametrize(
    ("scoring", "message"),
    [
        (ScoringConfig(weights={"kv": -1.0}), "scoring.weights.kv: weight must be"),
        (
            ScoringConfig(
                weights={
                    "kv": 0.0,
                    "queue": 0.0,
                    "prefix": 0.0,
                    "net_penalty": 0.0,
                    "gpu_health": 0.0,
                }
            ),
            "every scorer",
        ),
        (ScoringConfig(prefix_load_factor=0.5), "prefix_load_factor must be >= 1"),
        (ScoringConfig(stale_after_s=0.0), "stale_after_s must be > 0"),
    ],
)
def test_unusable_scoring_settings_are_rejected(scoring: ScoringConfig, message: str) -> None:
    with pytest.raises(ScoringSetupError, match=message):
        resolve_scorers({s.name: s for s in builtin_scorers()}, scoring)


def test_prefix_load_factor_from_config_reaches_the_prefix_scorer() -> None:
    weighted = resolve_scorers(
        {s.name: s for s in builtin_scorers()}, ScoringConfig(prefix_load_factor=2.0)
    )
    (prefix,) = [w.scorer for w in weighted if w.name == "prefix"]
    assert getattr(prefix, "load_factor", None) == 2.0


def test_the_built_in_scorers_register_through_the_plugin_hook() -> None:
    host = PluginHost.load(entry_point_list=[], extra=[("core", core_plugin)])
    scorers = host.scorers()
    assert {name: s.default_weight for name, s in scorers.items()} == {
        "queue": 2.0,
        "kv": 1.0,
        "prefix": 3.0,
        "net_penalty": 1.0,
        "gpu_health": 2.0,
    }

"""Hedge delay learnt from TTFTs, the hedge budget and who is never hedged (pure, no clock)."""

from __future__ import annotations

import math

import attrs
import pytest

from infermesh.core.config import HedgingConfig
from infermesh.core.model import SloClass
from infermesh.core.policy import HedgingPolicy, PolicySet
from infermesh.router.hedging import HedgeBudget, HedgePlanner

EMPTY = PolicySet()


def planner(**overrides: object) -> HedgePlanner:
    return HedgePlanner(HedgingConfig(**overrides))  # type: ignore[arg-type]


def test_the_default_delay_holds_until_enough_samples_then_the_p95_is_used() -> None:
    p = planner(min_samples=20, default_delay_s=0.5, quantile=0.95, min_delay_s=0.0)
    for i in range(19):
        p.observe_ttft("m", 100, 0.01 * (i + 1))
    assert p.delay_s("m", 100) == 0.5
    for i in range(19, 100):
        p.observe_ttft("m", 100, 0.01 * (i + 1))
    assert p.delay_s("m", 100) == pytest.approx(0.95)


def test_the_delay_is_clamped_to_its_floor_and_ceiling() -> None:
    p = planner(min_samples=1, min_delay_s=0.05, max_delay_s=2.0)
    p.observe_ttft("fast", 10, 0.001)
    p.observe_ttft("slow", 10, 30.0)
    assert p.delay_s("fast", 10) == 0.05
    assert p.delay_s("slow", 10) == 2.0


def test_prompt_length_buckets_and_models_learn_separately() -> None:
    p = planner(min_samples=1, prompt_buckets=[256, 4096], min_delay_s=0.0)
    p.observe_ttft("m", 100, 0.1)
    p.observe_ttft("m", 3000, 0.8)
    p.observe_ttft("m", 100_000, 3.0)
    assert p.delay_s("m", 200) == pytest.approx(0.1)
    assert p.delay_s("m", 1000) == pytest.approx(0.8)
    assert p.delay_s("m", 50_000) == pytest.approx(3.0)
    assert p.delay_s("other", 100) == p.config.default_delay_s


def test_only_the_newest_window_of_samples_counts() -> None:
    p = planner(min_samples=1, window=10, min_delay_s=0.0)
    for _ in range(10):
        p.observe_ttft("m", 1, 5.0)
    for _ in range(10):
        p.observe_ttft("m", 1, 0.2)
    assert p.delay_s("m", 1) == pytest.approx(0.2)


def test_the_budget_allows_a_tenth_of_requests_plus_its_burst() -> None:
    budget = HedgeBudget(ratio=0.1, burst=2.0)
    spent = 0
    for _ in range(1000):
        budget.on_request()
        spent += budget.try_spend()
    assert spent <= 0.1 * 1000 + 2
    assert spent >= 0.1 * 1000 - 1


def test_an_empty_bucket_denies_and_refills_with_requests() -> None:
    p = planner(budget_ratio=0.5, budget_burst=1.0)
    assert p.may_fire("m") == ""
    assert p.may_fire("m") == "budget"
    p.plan("m", SloClass.STANDARD, 1, True, EMPTY)
    p.plan("m", SloClass.STANDARD, 1, True, EMPTY)
    assert p.may_fire("m") == ""


def test_a_saturated_fleet_is_not_hedged_and_spends_no_budget() -> None:
    saturated = {"m"}
    p = HedgePlanner(HedgingConfig(budget_burst=1.0), saturated=lambda m: m in saturated)
    assert p.may_fire("m") == "saturated"
    assert p.budget.tokens == 1.0
    saturated.clear()
    assert p.may_fire("m") == ""


def test_non_idempotent_requests_and_models_are_never_hedged() -> None:
    p = planner(non_idempotent_models=["writer"])
    assert not p.plan("m", SloClass.STANDARD, 1, False, EMPTY).enabled
    assert "non-idempotent" in p.plan("writer", SloClass.STANDARD, 1, True, EMPTY).reason
    assert p.plan("m", SloClass.STANDARD, 1, True, EMPTY).enabled


def test_disabled_in_config_means_no_hedges() -> None:
    plan = planner(enabled=False).plan("m", SloClass.LATENCY, 1, True, EMPTY)
    assert not plan.enabled
    assert math.isinf(plan.delay_s)


def test_a_policy_overrides_delay_and_count_or_turns_hedging_off() -> None:
    rules: dict[str, HedgingPolicy] = {
        "fast": HedgingPolicy(model="m", slo_class=SloClass.LATENCY, delay_s=0.05, max_hedges=2),
        "off": HedgingPolicy(model="m", slo_class=SloClass.BATCH, enabled=False),
    }
    policy = PolicySet.from_document(
        {"hedging": {name: attrs.asdict(rule) for name, rule in rules.items()}}
    )
    p = planner()
    latency = p.plan("m", SloClass.LATENCY, 1, True, policy)
    assert (latency.delay_s, latency.max_hedges) == (0.05, 2)
    batch = p.plan("m", SloClass.BATCH, 1, True, policy)
    assert not batch.enabled
    assert batch.reason == "hedging disabled by policy"
    standard = p.plan("m", SloClass.STANDARD, 1, True, policy)
    assert standard.delay_s == p.config.default_delay_s


def test_bad_budget_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="burst >= 1"):
        HedgeBudget(ratio=0.1, burst=0.5)

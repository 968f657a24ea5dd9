"""Prefix affinity: homes learnt from where requests went, the longest match over prefix keys,
neutral for prompts not seen recently, bounded memory, and reasons that say why."""

from __future__ import annotations

import attrs
import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import (
    GpuKey,
    GpuState,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.scoring.engine import ScoringEngine, ScoringSetupError, resolve_scorers
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.prefix import RECENT_S, PrefixIndex
from infermesh.core.scoring.scorers import PrefixAffinityScorer, builtin_scorers
from infermesh.core.scoring.state import StateStore

PREFIX = 0x5EED
NAMES = ("a", "b", "c")
NOW = 50.0


def key(name: str) -> TargetKey:
    return TargetKey(model="llama", node=name, endpoint=f"http://{name}:8000")


def request(*keys: int) -> RequestFeatures:
    return RequestFeatures(model="llama", prefix_key=keys[0], prefix_keys=keys)


def score(
    scorer: PrefixAffinityScorer, features: RequestFeatures | None = None, **loads: int
) -> dict[str, ScoreResult]:
    views = [TargetView(ModelState(key=key(n), running=loads.get(n, 0.0)), now=NOW) for n in NAMES]
    results = scorer.score(features or RequestFeatures(model="llama", prefix_key=PREFIX), views)
    return dict(zip(NAMES, results, strict=True))


def homed(home: str = "b", min_capacity: int = 4) -> PrefixAffinityScorer:
    """A scorer that has seen PREFIX go to `home`."""
    scorer = PrefixAffinityScorer(min_capacity=min_capacity)
    scorer.learn(RequestFeatures(model="llama", prefix_key=PREFIX), key(home).target_id, NOW)
    return scorer


def test_a_prompt_never_sent_anywhere_is_neutral_everywhere() -> None:
    results = score(PrefixAffinityScorer())
    assert {r.score for r in results.values()} == {0.5}
    assert results["a"].reason == "prefix not sent anywhere recently: neutral"
    no_key = score(PrefixAffinityScorer(), RequestFeatures(model="llama"))
    assert no_key["a"].reason == "no prefix key: neutral"


@pytest.mark.parametrize("home_load", [0, 1, 2, 3])
def test_the_home_keeps_its_prefix_below_the_minimum_capacity_while_others_idle(
    home_load: int,
) -> None:
    results = score(homed("b"), b=home_load)
    assert [n for n, r in results.items() if r.score == 1.0] == ["b"]
    assert results["a"].score == results["c"].score == 0.0
    assert "capacity 4 (minimum; bounded-load" in results["b"].reason
    assert "was sent to other replicas recently" in results["a"].reason


def test_at_the_minimum_capacity_the_home_scores_nothing_so_the_prefix_spills() -> None:
    results = score(homed("b"), b=4)
    assert results["b"].score == 0.0
    assert results["b"].reason.endswith("loaded (load 4 >= capacity 4 (minimum; bounded-load 3))")
    # every home is loaded: the others score as for a never-seen prompt
    assert results["a"].score == results["c"].score == 0.5
    assert results["a"].reason == ("every replica that got this prefix recently is loaded: neutral")


def test_when_every_home_is_loaded_a_long_prompt_spills_to_fast_replicas() -> None:
    # b holds the prefix but is at capacity; a at full speed, c at a third of it
    scorer = homed("b")
    views = [
        TargetView(ModelState(key=key("a"), itl_s=0.01), now=NOW),
        TargetView(ModelState(key=key("b"), itl_s=0.01, running=4), now=NOW),
        TargetView(ModelState(key=key("c"), itl_s=0.03), now=NOW),
    ]
    long_prompt = RequestFeatures(model="llama", prefix_key=PREFIX, prompt_tokens=4096)
    a, b, c = scorer.score(long_prompt, views)
    assert b.score == 0.0
    assert a.score == 0.5
    # c, at a third of the home's speed, would pay a slow cold prefill: it gets nothing
    assert c.score == 0.0
    # with a slower home, a replica as fast as it is a spill target too, scored by its speed
    slow_home = [views[0], TargetView(ModelState(key=key("b"), itl_s=0.03, running=4), now=NOW)]
    slow_home.append(views[2])
    a, b, c = scorer.score(long_prompt, slow_home)
    assert b.score == 0.0
    assert a.score == 0.5
    assert c.score == pytest.approx(0.5 / 9)
    assert "a cold prefill of ~4096 tokens at 0.33x the fastest" in c.reason
    # while the home has room, the others still score nothing
    idle_home = [views[0], TargetView(ModelState(key=key("b"), itl_s=0.01), now=NOW), views[2]]
    a, b, c = scorer.score(long_prompt, idle_home)
    assert (a.score, b.score, c.score) == (0.0, 1.0, 0.0)


def test_above_the_minimum_the_bounded_load_rule_decides() -> None:
    # total 33: capacity ceil(1.25 * 34 / 3) = 15
    kept = score(homed("b"), a=10, c=10, b=13)
    assert kept["b"].score == 1.0
    assert "load 13 < capacity 15 (bounded-load)" in kept["b"].reason
    # total 40: capacity ceil(1.25 * 41 / 3) = 18
    spilled = score(homed("b"), a=10, c=10, b=20)
    assert spilled["b"].score == 0.0
    assert "loaded (load 20 >= capacity 18 (bounded-load))" in spilled["b"].reason


def test_a_minimum_of_zero_is_the_pure_bounded_load_rule() -> None:
    # one request on the home, the others idle: capacity ceil(1.25 * 2 / 3) = 1
    results = score(homed("b", min_capacity=0), b=1)
    assert results["b"].score == 0.0
    assert "capacity 1 (bounded-load)" in results["b"].reason


def test_the_longest_match_wins_and_a_shared_system_prompt_gets_partial_credit() -> None:
    tenant, session, turn2 = 0x7E, 0x5E55, 0x7272
    scorer = PrefixAffinityScorer()
    # another session of the tenant went to a; this session's first turn (128 tokens) to c
    scorer.learn(request(tenant, 0x0123), key("a").target_id, NOW)
    scorer.learn(request(tenant, session), key("c").target_id, NOW)
    # the second turn repeats the first and goes deeper
    results = score(scorer, request(tenant, session, turn2))
    assert results["c"].score == 1.0
    assert "first ~128 tokens sent here recently" in results["c"].reason
    assert results["a"].score == 0.5  # only the tenant's first 64 of 128 tokens
    assert "(another replica matches ~128)" in results["a"].reason
    assert results["b"].score == 0.0


def test_a_long_cold_prompt_prefers_fast_replicas_and_a_short_one_does_not_care() -> None:
    # a at full speed (10 ms per token), b at a third of it, c unmeasured
    views = [
        TargetView(ModelState(key=key("a"), itl_s=0.01), now=NOW),
        TargetView(ModelState(key=key("b"), itl_s=0.03), now=NOW),
        TargetView(ModelState(key=key("c")), now=NOW),
    ]
    scorer = PrefixAffinityScorer()
    long_prompt = RequestFeatures(model="llama", prefix_key=PREFIX, prompt_tokens=4096)
    a, b, c = scorer.score(long_prompt, views)
    # 0.5 * relative speed ** (prompt tokens / 2048): twice the prompt, the square of the speed
    assert a.score == 0.5
    assert b.score == pytest.approx(0.5 / 9)
    assert "a cold prefill of ~4096 tokens at 0.33x the fastest" in b.reason
    # not measured yet: taken at the median measured speed (2/3 of the fastest), not as fast
    assert c.score == pytest.approx(0.5 * (2 / 3) ** 2)
    assert "not measured yet, taken at the candidates' median speed (0.67x" in c.reason
    short = RequestFeatures(model="llama", prefix_key=PREFIX, prompt_tokens=512)
    assert scorer.score(short, views)[1].score == pytest.approx(0.5 * (1 / 3) ** 0.25)
    unknown = RequestFeatures(model="llama", prefix_key=PREFIX)
    assert {r.score for r in scorer.score(unknown, views)} == {0.5}


def test_a_never_seen_prompt_still_keeps_off_a_replica_at_capacity() -> None:
    results = score(PrefixAffinityScorer(), b=5)
    assert results["b"].score == 0.0
    assert results["b"].reason == (
        "prefix not sent anywhere recently, and loaded "
        "(load 5 >= capacity 4 (minimum; bounded-load 3))"
    )
    assert results["a"].score == results["c"].score == 0.5


def test_a_prefix_not_seen_for_longer_than_the_window_is_neutral_again() -> None:
    scorer = homed("b")
    views = [TargetView(ModelState(key=key(n)), now=NOW + RECENT_S + 1) for n in NAMES]
    results = scorer.score(RequestFeatures(model="llama", prefix_key=PREFIX), views)
    assert {r.score for r in results} == {0.5}


def test_the_index_is_bounded_in_keys_and_in_homes_per_key() -> None:
    index = PrefixIndex(max_keys=3, homes_per_key=2)
    for k in range(1, 6):
        index.record((k,), "t1", float(k))
    assert len(index) == 3
    assert list(index.matches((1, 2), 10.0)) == []  # the oldest keys were dropped
    assert list(index.matches((5,), 10.0)) == [(0, ["t1"])]
    for t in ("t1", "t2", "t3"):
        index.record((5,), t, 10.0)
    assert list(index.matches((5,), 10.0)) == [(0, ["t3", "t2"])]
    with pytest.raises(ValueError, match="max_keys >= 1"):
        PrefixIndex(max_keys=0)
    with pytest.raises(ValueError, match="recent_s must be a finite number > 0"):
        PrefixIndex(recent_s=float("nan"))


def test_the_engine_teaches_the_scorer_where_each_request_went() -> None:
    store = StateStore()
    for i, n in enumerate(NAMES):
        delta = {"running": 0.0 if n == "c" else 2.0, "last_updated": NOW}
        store.apply_model_delta(ModelStateDelta(key(n), i + 1, delta))
    registered = {s.name: s for s in builtin_scorers()}
    engine = ScoringEngine.from_config(store, InflightTracker(), registered, ScoringConfig())
    features = request(PREFIX)
    first = engine.rank(features, NOW)
    assert first.targets[0].target_id == key("c").target_id  # new prefix: the idle one
    # c is now busier than the others, but it holds the prefix
    store.apply_model_delta(ModelStateDelta(key("c"), 9, {"running": 3.0, "last_updated": NOW}))
    second = engine.rank(features, NOW + 1)
    assert second.targets[0].target_id == key("c").target_id
    # every engine has its own memory: a fresh one has not seen the prefix
    other = ScoringEngine.from_config(store, InflightTracker(), registered, ScoringConfig())
    assert other.rank(features, NOW + 1).targets[0].target_id != key("c").target_id


def test_the_minimum_capacity_comes_from_scoring_config() -> None:
    registered = {s.name: s for s in builtin_scorers()}
    (prefix,) = [
        ws.scorer
        for ws in resolve_scorers(registered, ScoringConfig(prefix_min_capacity=16))
        if ws.name == "prefix"
    ]
    assert isinstance(prefix, PrefixAffinityScorer)
    assert prefix.min_capacity == 16
    assert ScoringConfig().prefix_min_capacity == 4


def test_a_negative_minimum_capacity_is_a_clear_startup_error() -> None:
    registered = {s.name: s for s in builtin_scorers()}
    with pytest.raises(
        ScoringSetupError, match=r"scoring\.prefix_min_capacity must be >= 0, got -1"
    ):
        resolve_scorers(registered, ScoringConfig(prefix_min_capacity=-1))


def gpu_view(
    name: str, gpu_name: str, *, running: float = 0.0, itl_s: float | None = None
) -> TargetView:
    gpu = GpuState(key=GpuKey(node=name, gpu_uuid=f"GPU-{name}"), name=gpu_name)
    state = ModelState(key=key(name), running=running, itl_s=itl_s)
    return TargetView(state, gpus=(gpu,), now=NOW)


def test_before_anything_is_measured_a_long_cold_prompt_prefers_the_faster_gpu_model() -> None:
    views = [
        gpu_view("a", "NVIDIA H100 80GB HBM3"),
        gpu_view("b", "NVIDIA A10"),
        gpu_view("c", "some unknown card"),
    ]
    long_prompt = RequestFeatures(model="llama", prefix_key=PREFIX, prompt_tokens=2048)
    a, b, c = PrefixAffinityScorer().score(long_prompt, views)
    assert a.score == 0.5
    # dense bf16 TFLOPS: an A10 is 125/989 of an H100
    assert b.score == pytest.approx(0.5 * 125 / 989)
    assert "not measured yet: prior from GPU model A10" in b.reason
    # an unknown card: the median of the others' speeds
    assert c.score == pytest.approx(0.5 * ((989 + 125) / 2) / 989)
    assert "taken at the candidates' median speed" in c.reason


def test_a_measured_rate_wins_over_the_prior_and_calibrates_the_unmeasured() -> None:
    # the A10 has served (itl 30 ms); the H100 has not: the datasheet says it is faster
    views = [gpu_view("a", "NVIDIA H100 80GB HBM3"), gpu_view("b", "NVIDIA A10", itl_s=0.03)]
    long_prompt = RequestFeatures(model="llama", prefix_key=PREFIX, prompt_tokens=2048)
    a, b = PrefixAffinityScorer().score(long_prompt, views)
    assert a.score == 0.5
    assert b.score == pytest.approx(0.5 * 125 / 989)
    assert "measured speed" in b.reason
    # a second A10 not measured yet is taken at its model's measured rate
    views.append(gpu_view("c", "NVIDIA A10"))
    *_, c = PrefixAffinityScorer().score(long_prompt, views)
    assert c.score == pytest.approx(b.score)
    assert "prior from GPU model A10" in c.reason


def test_before_anything_is_measured_a_slow_gpu_gets_a_smaller_prefix_capacity() -> None:
    scorer = homed("b", min_capacity=4)
    views = [
        gpu_view("a", "NVIDIA H100 80GB HBM3"),
        gpu_view("b", "NVIDIA A10", running=2),
        gpu_view("c", "NVIDIA H100 80GB HBM3"),
    ]
    _, b, _ = scorer.score(RequestFeatures(model="llama", prefix_key=PREFIX), views)
    # decode bandwidth 600 of 3,350 GB/s: capacity ceil(4 x 0.18) = 1, and it holds 2
    assert b.score == 0.0
    assert "capacity 1 (scaled to its 0.18x median decode speed)" in b.reason


def test_when_every_home_is_loaded_an_unmeasured_replica_on_a_fast_gpu_may_take_the_spill() -> None:
    # b (an H100, measured) holds the prefix and is at capacity; a is an H100 that has served
    # nothing yet, c an idle A10: the prior says a is as fast as the home, c is not
    scorer = homed("b")
    views = [
        gpu_view("a", "NVIDIA H100 80GB HBM3"),
        gpu_view("b", "NVIDIA H100 80GB HBM3", itl_s=0.01, running=4),
        gpu_view("c", "NVIDIA A10"),
    ]
    long_prompt = request(PREFIX)
    a, b, c = scorer.score(attrs.evolve(long_prompt, prompt_tokens=4096), views)
    assert b.score == 0.0
    assert a.score == 0.5
    assert a.reason == "every replica that got this prefix recently is loaded: neutral"
    assert c.score == 0.0
    assert "was sent to other replicas recently" in c.reason

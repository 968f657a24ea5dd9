"""The engine model against published vLLM figures, and its KV-cache and speed behaviour.

Each calibrated profile carries the figures it was fitted to (`GpuProfile.calibration`); these
tests replay each figure's benchmark through the engine model in virtual time and require every
published figure to be matched within 20%.
"""

from __future__ import annotations

import pytest

from infermesh.dev.calibration import run_point
from infermesh.dev.engine import Engine, EngineConfig, EngineRequest, simulate
from infermesh.dev.kv_cache import BlockPool
from infermesh.dev.profiles import PROFILES, CalibrationPoint, GpuProfile, get_profile

TOLERANCE = 0.20

CALIBRATED = [
    pytest.param(profile, index, id=f"{profile.name}-c{point.concurrency}")
    for profile in PROFILES.values()
    for index, point in enumerate(profile.calibration)
]


def within(measured: float, published: float) -> bool:
    return abs(measured - published) <= TOLERANCE * published


@pytest.mark.parametrize(("profile", "index"), CALIBRATED)
def test_the_model_matches_each_published_figure_within_20_percent(
    profile: GpuProfile, index: int
) -> None:
    point = profile.calibration[index]
    measured = run_point(profile, point)
    checks = [
        ("output tokens/s", measured.output_tokens_per_s, point.output_tokens_per_s),
        ("TTFT s", measured.ttft_s, point.ttft_s),
        ("TPOT s", measured.itl_s, point.itl_s),
    ]
    claimed = [(name, got, want) for name, got, want in checks if want is not None]
    assert claimed, f"{profile.name}: a calibration point without any figure"
    misses = [
        f"{name}: model {got:.4g} vs published {want:.4g}"
        for name, got, want in claimed
        if not within(got, want)
    ]
    assert not misses, f"{profile.name} at concurrency {point.concurrency}: {misses}"


def test_the_figures_cover_several_batch_sizes_and_both_latencies() -> None:
    points = [point for profile in PROFILES.values() for point in profile.calibration]
    assert len({point.concurrency for point in points}) >= 3
    assert any(point.ttft_s is not None for point in points)
    assert any(point.itl_s is not None for point in points)
    assert all(
        len(profile.calibration) >= 2 for profile in PROFILES.values() if profile.calibration
    )


def test_every_gpu_profile_names_its_source() -> None:
    for profile in PROFILES.values():
        if profile.instant:
            continue
        assert profile.source, profile.name
        if not profile.calibration:
            assert profile.source.startswith("derived from "), profile.name


@pytest.mark.parametrize(
    ("name", "base", "bandwidth_ratio"),
    [
        ("a100", "a100-40gb", 2039 / 1555),
        ("l40s", "h100", 864 / 3350),
        ("a10", "a100-40gb", 600 / 1555),
        ("a100-mig-3g.40gb", "a100-40gb", 1019.5 / 1555),
    ],
)
def test_a_derived_card_decodes_slower_by_its_memory_bandwidth_ratio(
    name: str, base: str, bandwidth_ratio: float
) -> None:
    point = CalibrationPoint(concurrency=4, input_tokens=64, output_tokens=128)
    derived, measured = run_point(get_profile(name), point), run_point(get_profile(base), point)
    # Decode dominates: the per-token time scales by the bandwidth ratio (prefill adds a little).
    assert measured.itl_s / derived.itl_s == pytest.approx(bandwidth_ratio, rel=0.05)


def test_the_profiles_cover_the_cards_of_the_issue() -> None:
    for name in ("h100", "a100", "l40s", "a10", "a100-mig-3g.40gb"):
        assert get_profile(name).calibration or get_profile(name).source


# ---------------------------------------------------------------------- context-length costs


def config(**overrides: object) -> EngineConfig:
    values: dict[str, object] = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 8192,
        "num_gpu_blocks": 2048,
        "block_size": 16,
        "max_model_len": 16_384,
        "prefill_tokens_per_s": 10_000.0,
        "step_base_s": 0.010,
        "step_per_seq_s": 0.001,
        "step_per_kv_token_s": 1e-6,
        "prefill_per_token_pair_s": 1e-9,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def request(request_id: str, prompt_tokens: int, max_tokens: int, base: int) -> EngineRequest:
    return EngineRequest(request_id, range(base, base + prompt_tokens), max_tokens)


def mean_tpot(prompt_tokens: int) -> float:
    arrivals = [(0.0, request(f"r{i}", prompt_tokens, 32, 100_000 * i)) for i in range(4)]
    sim = simulate(Engine(config(max_num_batched_tokens=20_000)), arrivals)  # one prefill step
    itls = [itl for step in sim.steps for itl in step.stats.itls_s]
    return sum(itls) / len(itls)


def test_decode_steps_get_longer_as_the_context_in_the_kv_cache_grows() -> None:
    short, long = mean_tpot(100), mean_tpot(4000)
    # Same batch of 4: the only difference is reading ~3900 more cached tokens per sequence.
    assert long - short == pytest.approx(4 * 3900 * 1e-6, rel=0.02)


def test_prefill_attention_makes_a_long_prompt_cost_more_than_linearly() -> None:
    def prefill_s(prompt_tokens: int) -> float:
        engine = Engine(config())
        engine.submit(request("r", prompt_tokens, 1, 0), now=0.0)
        return engine.step(0.0).duration_s

    one, eight = prefill_s(1000), prefill_s(8000)
    linear = 0.010 + 0.001 + 8000 / 10_000
    assert eight == pytest.approx(linear + 8000 * 8001 / 2 * 1e-9)
    assert eight - 0.011 > 8 * (one - 0.011)


# ---------------------------------------------------------------------- KV cache under pressure


def test_requests_are_preempted_when_the_kv_cache_runs_out_and_all_still_complete() -> None:
    profile = get_profile("a10")
    engine = Engine(EngineConfig.from_profile(profile, num_gpu_blocks=600, max_model_len=4096))
    arrivals = [
        (0.01 * i, request(f"r{i}", 1500, 400, 100_000 * i)) for i in range(10)
    ]  # 10 x 1900 tokens = 1190 blocks at the end, twice the pool

    sim = simulate(engine, arrivals)

    preemptions = sum(step.stats.preemptions for step in sim.steps)
    assert preemptions > 0
    assert all(timing.output_tokens == 400 for timing in sim.requests.values())
    assert all(timing.finish_s is not None for timing in sim.requests.values())
    assert not engine.has_unfinished()
    assert engine.snapshot().num_free_blocks == 600
    finished = [f for step in sim.steps for f in step.stats.finished]
    assert sum(f.num_preemptions for f in finished) == preemptions
    # A preempted request recomputes its KV: more prompt tokens computed than it has.
    assert any(f.prefill_computed_tokens > f.prompt_tokens for f in finished)


def test_eviction_frees_cached_prefix_blocks_least_recently_used_first() -> None:
    engine = Engine(config(num_gpu_blocks=64, max_model_len=1024, max_num_seqs=4))
    system_a = list(range(320))  # 20 blocks
    system_b = list(range(10_000, 10_320))
    sim = simulate(
        engine,
        [
            (0.0, EngineRequest("a1", [*system_a, 1], 1)),
            (1.0, EngineRequest("b1", [*system_b, 1], 1)),
            (2.0, EngineRequest("a2", [*system_a, 2], 1)),  # touches A: B is now the LRU entry
            (3.0, EngineRequest("big", range(50_000, 50_640), 1)),  # 40 blocks: evicts 16+
            (4.0, EngineRequest("a3", [*system_a, 3], 1)),
            (5.0, EngineRequest("b2", [*system_b, 4], 1)),
        ],
    )

    cached = {rid: timing.cached_tokens for rid, timing in sim.requests.items()}
    assert cached["a2"] == 320
    assert cached["a3"] == 320  # recently used: kept
    assert cached["b2"] < 320  # least recently used: its blocks were reused for "big"
    assert engine.pool.num_evictions > 0


def test_a_prefix_hit_is_found_by_block_hash_whatever_follows_it() -> None:
    engine = Engine(config())
    system = list(range(512))  # 32 full blocks
    arrivals = [
        (float(i), EngineRequest(f"t{i}", [*system, *range(90_000 + 100 * i, 90_050 + 100 * i)], 2))
        for i in range(3)
    ]
    sim = simulate(engine, arrivals)
    assert [sim.requests[f"t{i}"].cached_tokens for i in range(3)] == [0, 512, 512]


def test_a_huge_pool_costs_memory_only_for_the_blocks_used() -> None:
    pool = BlockPool(10**12)
    blocks = pool.allocate(3)
    assert blocks == [0, 1, 2]
    assert pool.num_free_blocks == 10**12 - 3
    pool.free(blocks)
    assert pool.num_free_blocks == 10**12


# ---------------------------------------------------------------------- throttled GPUs


def test_a_throttled_gpu_runs_its_profile_slower_by_the_factor() -> None:
    profile = get_profile("h100")
    point = CalibrationPoint(concurrency=8, input_tokens=200, output_tokens=64)
    full, half = run_point(profile, point), run_point(profile, point, speed_factor=0.5)
    assert half.itl_s == pytest.approx(2 * full.itl_s)
    assert half.ttft_s == pytest.approx(2 * full.ttft_s)
    assert half.output_tokens_per_s == pytest.approx(full.output_tokens_per_s / 2)


def test_the_speed_factor_changes_at_run_time_from_the_next_step() -> None:
    engine = Engine(config())
    engine.submit(request("r", 100, 4, 0), now=0.0)
    first = engine.step(0.0)
    normal = engine.step(first.end_s)
    engine.speed_factor = 0.25
    slow = engine.step(normal.end_s)
    assert slow.duration_s == pytest.approx(4 * normal.duration_s, rel=0.01)


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_a_speed_factor_outside_zero_to_one_is_refused(factor: float) -> None:
    engine = Engine(config())
    with pytest.raises(ValueError, match="speed_factor must be in"):
        engine.speed_factor = factor

"""The engine model under virtual time: batching, step times, KV blocks, prefix cache."""

from __future__ import annotations

import pytest

from infermesh.dev.engine import Engine, EngineConfig, EngineRequest, simulate
from infermesh.dev.kv_cache import BlockPool, hash_prompt_blocks
from infermesh.dev.profiles import PROFILES, get_profile
from infermesh.dev.tokens import count_tokens, tokenize


def config(**overrides: object) -> EngineConfig:
    values: dict[str, object] = {
        "max_num_seqs": 8,
        "max_num_batched_tokens": 2048,
        "num_gpu_blocks": 1024,
        "block_size": 16,
        "max_model_len": 4096,
        "prefill_tokens_per_s": 10_000.0,
        "step_base_s": 0.010,
        "step_per_seq_s": 0.001,
    }
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


def request(
    request_id: str, prompt_tokens: int = 64, max_tokens: int = 16, base: int = 0
) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        prompt_token_ids=[base + i for i in range(prompt_tokens)],
        max_tokens=max_tokens,
    )


def test_continuous_batching_serves_a_batch_much_faster_than_one_at_a_time() -> None:
    arrivals = [(0.0, request(f"r{i}", base=1000 * i)) for i in range(8)]
    batched = simulate(Engine(config(max_num_seqs=8)), arrivals)
    serial = simulate(Engine(config(max_num_seqs=1)), [(t, r) for t, r in arrivals])

    assert all(t.output_tokens == 16 for t in batched.requests.values())
    assert batched.end_s < serial.end_s / 4


def test_decode_step_time_grows_with_batch_size() -> None:
    def mean_itl(batch: int) -> float:
        sim = simulate(
            Engine(config(max_num_seqs=batch)),
            [(0.0, request(f"r{i}", base=1000 * i, max_tokens=32)) for i in range(batch)],
        )
        itls = [itl for step in sim.steps for itl in step.stats.itls_s]
        return sum(itls) / len(itls)

    single, eight = mean_itl(1), mean_itl(8)
    assert single == pytest.approx(0.010 + 0.001)
    assert eight == pytest.approx(0.010 + 0.008)


def test_kv_blocks_fill_as_a_sequence_grows_and_are_freed_when_it_finishes() -> None:
    engine = Engine(config(num_gpu_blocks=64, max_model_len=1024))
    engine.submit(request("r", prompt_tokens=40, max_tokens=20), now=0.0)

    first = engine.step(0.0)  # prefill: 40 tokens need 3 blocks of 16
    assert engine.snapshot().num_free_blocks == 64 - 3
    now = first.end_s
    while engine.snapshot().num_free_blocks == 64 - 3:
        now = engine.step(now).end_s
    assert engine.snapshot().num_free_blocks == 64 - 4  # crossed token 48
    while engine.has_unfinished():
        now = engine.step(now).end_s

    snapshot = engine.snapshot()
    assert snapshot.num_free_blocks == 64
    assert snapshot.kv_cache_usage == 0.0
    assert snapshot.num_cached_blocks == 2  # the two full prompt blocks stay findable


def test_kv_cache_usage_reports_the_fraction_of_blocks_in_use() -> None:
    engine = Engine(config(num_gpu_blocks=100, max_model_len=1024))
    for i in range(5):
        engine.submit(request(f"r{i}", prompt_tokens=32, max_tokens=8, base=1000 * i), now=0.0)
    engine.step(0.0)
    assert engine.snapshot().kv_cache_usage == pytest.approx(5 * 2 / 100)


def test_prefix_cache_hits_make_the_second_request_start_sooner() -> None:
    engine = Engine(config(prefill_tokens_per_s=2_000.0))
    shared = list(range(1000))
    first = EngineRequest("first", [*shared, 5001, 5002], max_tokens=4)
    second = EngineRequest("second", [*shared, 6001, 6002], max_tokens=4)
    sim = simulate(engine, [(0.0, first), (1.0, second)])

    assert sim.requests["first"].cached_tokens == 0
    assert sim.requests["second"].cached_tokens == 992  # 62 full blocks of 16
    ttft_first, ttft_second = sim.requests["first"].ttft_s, sim.requests["second"].ttft_s
    assert ttft_first is not None
    assert ttft_second is not None
    assert ttft_second < ttft_first / 10
    queried = sum(step.stats.prefix_queries_tokens for step in sim.steps)
    hits = sum(step.stats.prefix_hits_tokens for step in sim.steps)
    assert (queried, hits) == (2004, 992)


def test_fully_cached_prompt_still_computes_its_last_block() -> None:
    engine = Engine(config())
    prompt = list(range(64))
    sim = simulate(
        engine,
        [(0.0, EngineRequest("a", prompt, 2)), (1.0, EngineRequest("b", prompt, 2))],
    )
    assert sim.requests["b"].cached_tokens == 48


def test_disabled_prefix_cache_never_hits() -> None:
    engine = Engine(config(enable_prefix_caching=False))
    prompt = list(range(256))
    sim = simulate(
        engine,
        [(0.0, EngineRequest("a", prompt, 2)), (1.0, EngineRequest("b", prompt, 2))],
    )
    assert sim.requests["b"].cached_tokens == 0


def test_requests_beyond_max_num_seqs_wait_in_the_queue() -> None:
    engine = Engine(config(max_num_seqs=2))
    for i in range(5):
        engine.submit(request(f"r{i}", base=1000 * i), now=0.0)
    engine.step(0.0)
    snapshot = engine.snapshot()
    assert (snapshot.running, snapshot.waiting) == (2, 3)


def test_queued_requests_run_in_arrival_order_as_slots_free_up() -> None:
    arrivals = [(0.001 * i, request(f"r{i}", base=1000 * i)) for i in range(4)]
    sim = simulate(Engine(config(max_num_seqs=1)), arrivals)
    finishes = [sim.requests[f"r{i}"].finish_s for i in range(4)]
    done = [f for f in finishes if f is not None]
    assert len(done) == 4
    assert done == sorted(done)


def test_a_request_waits_when_the_pool_has_too_few_blocks() -> None:
    engine = Engine(config(num_gpu_blocks=10, max_model_len=160))
    engine.submit(request("big", prompt_tokens=120, max_tokens=8), now=0.0)  # 8 blocks
    engine.submit(request("next", prompt_tokens=40, max_tokens=8, base=5000), now=0.0)  # 3 blocks
    engine.step(0.0)
    assert (engine.snapshot().running, engine.snapshot().waiting) == (1, 1)


def test_preemption_when_blocks_run_out_and_every_request_still_finishes() -> None:
    engine = Engine(config(num_gpu_blocks=24, max_model_len=256, max_num_seqs=8))
    arrivals = [
        (0.0, request(f"r{i}", prompt_tokens=40, max_tokens=100, base=1000 * i)) for i in range(4)
    ]
    sim = simulate(engine, arrivals)

    assert sum(step.stats.preemptions for step in sim.steps) > 0
    assert all(t.output_tokens == 100 for t in sim.requests.values())
    assert engine.snapshot().num_free_blocks == 24


def test_long_prompts_are_prefilled_in_chunks_of_the_token_budget() -> None:
    engine = Engine(config(max_num_batched_tokens=512))
    sim = simulate(engine, [(0.0, request("long", prompt_tokens=2000, max_tokens=2))])
    prefill_steps = [s for s in sim.steps if s.stats.scheduled_tokens > 1]
    assert [s.stats.scheduled_tokens for s in prefill_steps] == [512, 512, 512, 464]


def test_abort_frees_the_blocks_and_reports_an_abort() -> None:
    engine = Engine(config(num_gpu_blocks=64, max_model_len=1024))
    engine.submit(request("r", prompt_tokens=100), now=0.0)
    engine.step(0.0)
    finished = engine.abort("r", now=0.5)

    assert finished is not None
    assert finished.finish_reason == "abort"
    assert engine.snapshot().num_free_blocks == 64
    assert not engine.has_unfinished()
    assert engine.abort("r", now=0.6) is None


def test_a_request_longer_than_the_context_is_refused() -> None:
    engine = Engine(config(max_model_len=128))
    with pytest.raises(ValueError, match="exceed max_model_len=128"):
        engine.submit(request("r", prompt_tokens=120, max_tokens=16), now=0.0)


def test_engine_config_rejects_a_pool_smaller_than_one_sequence() -> None:
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        config(num_gpu_blocks=4, max_model_len=1024)


def test_faster_profiles_finish_the_same_work_sooner() -> None:
    def makespan(profile: str) -> float:
        engine = Engine(EngineConfig.from_profile(get_profile(profile)))
        arrivals = [
            (0.0, request(f"r{i}", prompt_tokens=500, max_tokens=64, base=1000 * i))
            for i in range(16)
        ]
        return simulate(engine, arrivals).end_s

    order = ["h100", "a100", "a100-40gb", "a100-mig-3g.40gb", "l40s", "a10", "l4"]
    makespans = [makespan(name) for name in order]
    assert makespans == sorted(makespans), dict(zip(order, makespans, strict=True))


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown GPU profile 'v100'.*h100"):
        get_profile("v100")
    assert PROFILES["instant"].step_s(64, 10_000) == 0.0


def test_freed_cached_blocks_are_evicted_least_recently_freed_first() -> None:
    pool = BlockPool(4)
    first, second = pool.allocate(2), pool.allocate(2)
    assert first is not None
    assert second is not None
    pool.register(first[0], 111)
    pool.register(second[0], 222)
    pool.free(first)
    pool.free(second)

    reused = pool.allocate(2)  # takes the first sequence's blocks

    assert reused is not None
    assert set(reused) == set(first)
    assert pool.lookup([111]) == []
    assert pool.lookup([222]) == [second[0]]


def test_block_hashes_chain_so_equal_blocks_after_different_prefixes_differ() -> None:
    a = hash_prompt_blocks([1] * 16 + [2] * 16, 16)
    b = hash_prompt_blocks([3] * 16 + [2] * 16, 16)
    assert len(a) == 2
    assert a[1] != b[1]
    assert hash_prompt_blocks([1] * 15, 16) == []


def test_tokenizer_is_deterministic_at_about_four_characters_per_token() -> None:
    text = "You are a helpful assistant for a payments platform."
    assert tokenize(text) == tokenize(text)
    assert len(tokenize(text)) == count_tokens(text) == 13
    assert tokenize(text + " more")[:12] == tokenize(text)[:12]

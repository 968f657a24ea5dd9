"""The peers' routing strategies behave as their sources describe, on hand-built fleet views."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from infermesh.dev.sim.route.baselines import (
    BASELINES,
    CacheAware,
    LeastRequest,
    LlmdScorers,
    LoadIndex,
    PowerOfTwo,
    RandomChoice,
    RoundRobin,
)
from infermesh.dev.sim.route.strategy import ReplicaView, SimRequest, Strategy, block_hashes
from infermesh.dev.sim.workloads import generate


def fleet(count: int, waiting: int = 0) -> list[ReplicaView]:
    return [
        ReplicaView(f"r{i}", index=i, node=f"n{i}", profile="h100", rtt_s=0.0, waiting=waiting)
        for i in range(count)
    ]


def send(strategy: Strategy, request: SimRequest, replicas: list[ReplicaView], now: float) -> str:
    """Route `request` as the simulator does: the chosen view counts it in flight."""
    chosen = strategy.choose(request, replicas, now)
    assert chosen is not None
    replicas[int(chosen[1:])].in_flight += 1
    return chosen


def finish(
    strategy: Strategy, request: SimRequest, replica_id: str, replicas: list[ReplicaView]
) -> None:
    replicas[int(replica_id[1:])].in_flight -= 1
    strategy.on_finish(request, replica_id, 1.0, ok=True)


def chat(request_id: str, group: str = "sys", prompt: int = 1000, prefix: int = 960) -> SimRequest:
    return SimRequest(request_id, 0.0, prompt, 10, prefix_group=group, prefix_tokens=prefix)


def plain(request_id: str, prompt: int = 200) -> SimRequest:
    return SimRequest(request_id, 0.0, prompt, 10)


def test_registry_names_every_peer_strategy_by_its_own_name() -> None:
    assert sorted(BASELINES) == sorted(
        ["round_robin", "random", "least_request", "power_of_two", "cache_aware", "llmd"]
    )
    for name, factory in BASELINES.items():
        strategy: Strategy = factory(random.Random(0))
        assert strategy.name == name


def test_round_robin_cycles_the_fleet() -> None:
    replicas = fleet(3)
    strategy = RoundRobin(random.Random(0))
    picks = [strategy.choose(plain(f"q{i}"), replicas, 0.0) for i in range(7)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]


def test_random_is_reproducible_per_seed_and_covers_the_fleet() -> None:
    replicas = fleet(4)

    def picks(seed: int) -> list[str | None]:
        strategy = RandomChoice(random.Random(seed))
        return [strategy.choose(plain(f"q{i}"), replicas, 0.0) for i in range(400)]

    assert picks(1) == picks(1) != picks(2)
    assert all(70 < count < 130 for count in Counter(picks(1)).values())


def test_power_of_two_takes_the_less_loaded_of_its_two_draws() -> None:
    busy, idle = fleet(2)
    busy.in_flight, idle.in_flight = 7, 2
    strategy = PowerOfTwo(random.Random(0))
    assert {strategy.choose(plain(f"q{i}"), [busy, idle], 0.0) for i in range(20)} == {"r1"}
    replicas = fleet(3)
    for replica, load in zip(replicas, (0, 5, 9), strict=True):
        replica.in_flight = load
    picks = Counter(strategy.choose(plain(f"q{i}"), replicas, 0.0) for i in range(300))
    assert picks["r2"] == 0  # the most loaded loses every pair it is drawn into
    assert picks["r0"] > picks["r1"] > 0  # r0 wins 2 pairs of 3, r1 one


def test_least_request_spreads_evenly_and_refills_the_replica_that_finished() -> None:
    replicas = fleet(4)
    strategy = LeastRequest(random.Random(0))
    first = [send(strategy, plain(f"q{i}"), replicas, 0.0) for i in range(8)]
    assert Counter(first) == {"r0": 2, "r1": 2, "r2": 2, "r3": 2}
    finish(strategy, plain("q0"), "r2", replicas)
    assert send(strategy, plain("q8"), replicas, 1.0) == "r2"


def test_load_index_tracks_the_least_and_most_loaded() -> None:
    index = LoadIndex(3)
    for replica in (0, 0, 0, 1):
        index.started(replica)
    assert (index.min_load, index.max_load) == (0, 3)
    assert index.least_loaded(random.Random(0)) == 2
    index.started(2)
    index.started(2)
    index.finished(0)
    index.finished(0)
    assert index.loads == [1, 1, 2]
    assert (index.min_load, index.max_load) == (1, 2)
    index.finished(1)
    index.finished(1)  # never below zero
    assert (index.min_load, index.loads[1]) == (0, 0)


def test_cache_aware_follows_the_prefix_until_imbalance_then_shortest_queue() -> None:
    replicas = fleet(2)
    strategy = CacheAware(random.Random(0))
    picks = [send(strategy, chat(f"q{i}"), replicas, 0.0) for i in range(66)]
    # 65 in flight on r0 vs 0: 65 - 0 > 64 and 65 > 1.5 * 0, so the 66th goes to r1.
    assert picks[:65] == ["r0"] * 65
    assert picks[65] == "r1"
    for i in range(40):
        finish(strategy, chat(f"q{i}"), "r0", replicas)
    # Balanced again (25 vs 1): the prefix goes to the worker that took it most recently.
    assert send(strategy, chat("q66"), replicas, 1.0) == "r1"


def test_cache_aware_sends_a_cache_miss_to_the_smallest_tree() -> None:
    replicas = fleet(3)
    strategy = CacheAware(random.Random(0))
    assert strategy.choose(chat("a", group="tenant-a"), replicas, 0.0) == "r0"
    assert strategy.choose(chat("b", group="tenant-b"), replicas, 0.0) == "r1"
    assert strategy.choose(chat("a2", group="tenant-a"), replicas, 0.0) == "r0"
    # A prompt with under 30% matched is a miss: it goes to r2, whose tree is empty.
    assert strategy.choose(plain("c", prompt=300), replicas, 0.0) == "r2"
    assert strategy.choose(
        chat("low", group="tenant-b", prompt=1000, prefix=160), replicas, 0.0
    ) in ("r2",)


def test_cache_aware_evicts_least_recently_used_leaves_over_the_tree_size() -> None:
    replicas = fleet(2)
    # 64 blocks of 16 tokens (4 chars each) per worker; one 1000-token chat prompt is 62 blocks.
    strategy = CacheAware(random.Random(0), max_tree_size_chars=64 * 64, eviction_interval_s=10.0)
    old, new = chat("a", group="tenant-a"), chat("c", group="tenant-c")
    for request in (old, chat("b", group="tenant-b"), new):
        strategy.choose(request, replicas, 0.0)  # a -> r0, b -> r1, c -> r0 (equal trees)
    assert strategy.tree.size(0) == 124
    assert strategy.tree.match(block_hashes(old)) == (62, 0)
    strategy.choose(plain("tick"), replicas, 11.0)  # past the interval: trees shrink first
    assert strategy.tree.size(0) == 64
    # r0 kept the newer prompt whole and only the root blocks of the older one.
    assert strategy.tree.match(block_hashes(new)) == (62, 0)
    assert strategy.tree.match(block_hashes(old))[0] == 2


def test_llmd_queue_and_kv_scorers_prefer_short_queues_and_free_cache() -> None:
    replicas = fleet(3)
    strategy = LlmdScorers(random.Random(0))
    for replica, waiting, kv in zip(replicas, (0, 4, 8), (0.5, 0.5, 0.0), strict=True):
        replica.waiting, replica.kv_usage = waiting, kv
        strategy.observe(replica, 0.0)
    assert strategy.scores(plain("q"), replicas, []) == pytest.approx([3.0, 2.0, 2.0])
    assert strategy.choose(plain("q"), replicas, 0.0) == "r0"


def test_llmd_prefix_scorer_outweighs_a_slightly_longer_queue() -> None:
    replicas = fleet(2)
    strategy = LlmdScorers(random.Random(0))
    first = strategy.choose(chat("q0"), replicas, 0.0)
    assert first is not None
    holder = replicas[int(first[1:])]
    holder.waiting = 3  # queue score 0 vs the other's 1 (weight 2) ...
    strategy.observe(holder, 0.05)
    # ... but 60 of 62 blocks matched (weight 3 * 0.97) wins.
    assert strategy.choose(chat("q1"), replicas, 0.05) == first
    holder.kv_usage = 0.9  # now KV (2 * 0.9 lost) tips it the other way
    strategy.observe(holder, 0.1)
    assert strategy.choose(chat("q2"), replicas, 0.1) != first


def test_llmd_rejects_sheddable_requests_only_when_every_pod_is_saturated() -> None:
    replicas = fleet(2, waiting=6)
    strategy = LlmdScorers(random.Random(0))
    batch = SimRequest("b", 0.0, 100, 10, slo_class="batch")
    assert strategy.choose(batch, replicas, 0.1) is None
    assert strategy.choose(plain("interactive"), replicas, 0.1) is not None
    replicas[1].waiting, replicas[1].kv_usage = 5, 0.8  # at the thresholds: capacity left
    strategy.observe(replicas[1], 0.1)
    assert strategy.choose(batch, replicas, 0.1) == "r1"
    # Metrics older than the staleness threshold (2 s) count as no capacity.
    assert strategy.choose(batch, replicas, 2.5) is None


def test_llmd_picks_a_pod_with_the_plain_definitions_best_score() -> None:
    rng = random.Random(9)
    replicas = fleet(60)
    strategy = LlmdScorers(random.Random(0))
    requests = list(generate("chat", random.Random(2), 30.0, 10.0))
    for step, request in enumerate(requests):
        for replica in rng.sample(replicas, 5):  # a few scrapes arrive between decisions
            replica.waiting = rng.randrange(4)
            replica.kv_usage = rng.choice((0.0, 0.25, 0.5, rng.random()))
            strategy.observe(replica, float(step))
        hashes = block_hashes(request)[: strategy.max_prefix_blocks]
        expected = strategy.scores(request, replicas, hashes)
        chosen = strategy.choose(request, replicas, float(step))
        assert chosen is not None
        assert expected[int(chosen[1:])] == max(expected)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_replays_the_same_choices_for_the_same_seed(name: str) -> None:
    def run(seed: int) -> list[str | None]:
        replicas = fleet(8)
        strategy = BASELINES[name](random.Random(seed))
        picks: list[str | None] = []
        for request in generate("mixed", random.Random(1), 20.0, 10.0):
            scraped = replicas[len(picks) % 8]  # telemetry that moves
            scraped.waiting, scraped.telemetry_s = len(picks) % 5, request.arrival_s
            strategy.observe(scraped, request.arrival_s)
            pick = strategy.choose(request, replicas, request.arrival_s)
            picks.append(pick)
            if pick is not None:
                replicas[int(pick[1:])].in_flight += 1
                if len(picks) % 3 == 0:
                    finish(strategy, request, pick, replicas)
        return picks

    first = run(4)
    assert first == run(4)
    assert len(set(first) - {None}) > 1

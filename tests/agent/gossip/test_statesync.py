"""StateBook: node states spread by gossip into other agents' stores, with virtual clocks."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest

from infermesh.agent.gossip.statesync import VERSIONS_PER_EPOCH, StateBook, StateEntry
from infermesh.core.config import ScoringConfig
from infermesh.core.model import GpuKey, GpuState, ModelState, RequestFeatures, TargetKey
from infermesh.core.scoring.engine import ScoringEngine, resolve_scorers
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

KEY_A = TargetKey(model="m", node="a", endpoint="http://a:8000")
GPU_A = GpuKey(node="a", gpu_uuid="GPU-1")
CLUSTER = 9  # retransmit limit 4 x ceil(log10(10)) = 4


def book(node: str, epoch: int = 1) -> StateBook:
    return StateBook(node, StateStore(), epoch=epoch)


def target(last_updated: float, **changes: Any) -> ModelState:
    return attrs.evolve(ModelState(key=KEY_A, last_updated=last_updated, version=1), **changes)


def send(src: StateBook, src_now: float, dst: StateBook, dst_now: float) -> int:
    """Everything `src` would piggyback now, delivered to `dst`."""
    return dst.merge(dst_now, src.take(src_now, max_entries=100, cluster_size=CLUSTER))


def stored(dst: StateBook) -> ModelState:
    state = dst.store.get_model(KEY_A)
    assert state is not None
    return state


def test_published_state_lands_in_the_other_store_aged_on_the_receivers_clock() -> None:
    a, b = book("a"), book("b")
    a.publish(1000.0, target(999.5, running=3.0, waiting=2.0, kv_cache_usage=0.4))

    assert send(a, 1000.0, b, 50.0) == 1

    state = stored(b)
    assert state.last_updated == pytest.approx(49.5)
    assert (state.running, state.waiting, state.kv_cache_usage) == (3.0, 2.0, 0.4)
    assert state.version == b.version_of(KEY_A) == VERSIONS_PER_EPOCH + 2
    assert b.entries_merged == 1
    assert b.known_nodes() == ("a",)


def test_remote_target_is_ranked_by_the_receivers_engine() -> None:
    a, b = book("a"), book("b")
    a.publish(10.0, target(10.0))
    send(a, 10.0, b, 20.0)
    engine = ScoringEngine(
        b.store,
        InflightTracker(),
        resolve_scorers({s.name: s for s in builtin_scorers()}, ScoringConfig()),
    )

    ranking = engine.rank(RequestFeatures(model="m"), now=21.0)
    assert [r.target_id for r in ranking.targets] == [KEY_A.target_id]

    later = engine.rank(RequestFeatures(model="m"), now=26.0)  # no refresh for 6 s: stale after 5 s
    assert later.targets == ()
    assert "telemetry 6.0s old" in later.excluded[0].why


def test_gpu_state_spreads_like_a_target() -> None:
    a, b = book("a"), book("b")
    a.publish(5.0, GpuState(key=GPU_A, utilization=0.7, last_updated=4.0, version=3))
    send(a, 5.0, b, 100.0)
    gpu = b.store.get_gpu(GPU_A)
    assert gpu is not None
    assert gpu.utilization == 0.7
    assert gpu.last_updated == pytest.approx(99.0)


def test_old_and_repeated_entries_are_ignored() -> None:
    a, b = book("a"), book("b")
    a.publish(1.0, target(1.0, running=1.0))
    old = a.take(1.0, 10, CLUSTER)
    a.publish(2.0, target(2.0, running=2.0))
    new = a.take(2.0, 10, CLUSTER)

    assert b.merge(3.0, new) == 1
    assert b.merge(3.0, new) == 0
    assert b.merge(3.0, old) == 0

    assert stored(b).running == 2.0
    assert b.entries_stale == 2


def test_own_entries_echoed_back_are_ignored() -> None:
    a = book("a")
    a.publish(1.0, target(1.0))
    entries = a.take(1.0, 10, CLUSTER)
    assert a.merge(2.0, entries) == 0
    assert a.store.get_model(KEY_A) is None  # the book never writes this node's own states


@pytest.mark.parametrize(
    "bad",
    [
        StateEntry("b", target(1.0), VERSIONS_PER_EPOCH + 2, 0.1),  # origin is not the key's node
        StateEntry("a", target(1.0), -1, 0.1),
        StateEntry("a", target(1.0), VERSIONS_PER_EPOCH + 2, -0.5),
        StateEntry("a", target(1.0), VERSIONS_PER_EPOCH + 2, math.nan),
        StateEntry("a", target(1.0), VERSIONS_PER_EPOCH + 2, math.inf),
    ],
)
def test_malformed_entries_are_rejected_and_counted(bad: StateEntry) -> None:
    c = book("c")
    assert c.merge(1.0, [bad]) == 0
    assert c.entries_rejected == 1
    assert c.store.get_model(KEY_A) is None


def test_dead_node_targets_turn_unhealthy_until_the_origin_refutes() -> None:
    a, b = book("a"), book("b")
    a.publish(1.0, target(1.0))
    before_death = a.take(1.0, 10, CLUSTER)
    b.merge(1.0, before_death)

    b.node_gone(2.0, "a", "dead")

    marked = stored(b)
    assert not marked.healthy
    assert marked.health_reason == "node a is dead (gossip)"
    assert b.snapshot(2.0) == ()  # a gone node's states are not handed to others
    assert b.take(2.0, 10, CLUSTER) == ()  # nor relayed
    assert b.merge(2.5, before_death) == 0  # a late relay of its last entry does not revive it

    a.publish(3.0, target(3.0))  # a refuted; its next reading (a refresh) goes out
    send(a, 3.0, b, 3.0)
    assert stored(b).healthy
    assert [e.origin for e in b.snapshot(3.0)] == ["a"]


def test_node_gone_twice_still_lets_the_origin_win() -> None:
    a, b = book("a"), book("b")
    a.publish(1.0, target(1.0))
    send(a, 1.0, b, 1.0)
    b.node_gone(2.0, "a", "dead")
    b.node_gone(2.5, "a", "left")
    a.publish(3.0, target(3.0))
    send(a, 3.0, b, 3.0)
    assert stored(b).healthy


def test_restarted_origin_outbids_its_earlier_life() -> None:
    a_old, b = book("a", epoch=1_000), book("b")
    for i in range(5):
        a_old.publish(float(i), target(float(i), running=float(i), version=10 + i))
    old_entries = a_old.snapshot(5.0)
    b.merge(5.0, old_entries)
    b.node_gone(6.0, "a", "dead")

    a_new = book("a", epoch=9_000)  # restarted later: a larger epoch; adapter versions restart
    a_new.publish(10.0, target(10.0, running=7.0, version=1))
    send(a_new, 10.0, b, 10.0)
    b.merge(11.0, old_entries)  # its earlier life's entries still circulating

    state = stored(b)
    assert state.healthy
    assert state.running == 7.0


def test_relay_keeps_the_accumulated_age() -> None:
    a, b, c = book("a"), book("b"), book("c")
    a.publish(1000.0, target(999.8))  # read 0.2 s before publishing

    send(a, 1000.0, b, 10.0)  # B stores last_updated 9.8 on its clock
    relayed = b.take(10.5, 10, CLUSTER)  # B relays half a second later
    assert [e.age_s for e in relayed] == [pytest.approx(0.7)]

    c.merge(100.0, relayed)
    assert stored(c).last_updated == pytest.approx(99.3)
    assert c.known_nodes() == ("a",)


def test_take_respects_the_retransmit_limit() -> None:
    a = book("a")
    a.publish(1.0, target(1.0))
    sent = [len(a.take(1.0, 10, cluster_size=CLUSTER)) for _ in range(6)]
    assert sent == [1, 1, 1, 1, 0, 0]
    big = book("a")
    big.publish(1.0, target(1.0))
    assert sum(len(big.take(1.0, 10, cluster_size=999)) for _ in range(20)) == 12  # 4 x 3


def test_take_sends_the_newest_state_once_per_key_least_sent_first() -> None:
    a = book("a")
    gpu = GpuState(key=GPU_A, last_updated=1.0)
    a.publish(1.0, target(1.0, running=1.0))
    a.take(1.0, 10, CLUSTER)
    a.publish(1.1, gpu)
    a.publish(1.2, target(1.2, running=2.0))  # replaces the queued older state of the key

    first = a.take(1.2, 1, CLUSTER)
    assert [e.state.key for e in first] == [KEY_A]  # newest of the never-sent ones first
    assert first[0].state.running == 2.0  # type: ignore[union-attr]
    assert [e.state.key for e in a.take(1.2, 1, CLUSTER)] == [GPU_A]
    both = a.take(1.2, 10, CLUSTER)
    assert sorted(str(e.state.key) for e in both) == sorted([str(KEY_A), str(GPU_A)])


def test_last_updated_only_stream_is_coalesced_but_health_flips_go_out_at_once() -> None:
    a, b = book("a"), book("b")
    versions: set[int] = set()
    oldest_view_s = 0.0
    now = 0.0
    healthy = True
    for tick in range(100):  # 10 s of 10 Hz readings where nothing but the read time changes
        now = tick * 0.1
        if tick in (40, 41):
            healthy = not healthy  # a flip and back within 100 ms
        a.publish(now, target(now, healthy=healthy, health_reason="" if healthy else "down"))
        entries = a.take(now, 10, CLUSTER)
        versions.update(e.version for e in entries)
        b.merge(now, entries)
        if tick in (40, 41):
            assert stored(b).healthy is healthy  # went out on the same tick
        oldest_view_s = max(oldest_view_s, now - stored(b).last_updated)

    assert len(versions) <= 10 / a.refresh_s + 1 + 2  # refreshes, the first, the two flips
    assert oldest_view_s <= a.refresh_s + 0.1 + 1e-9  # never near stale_after_s (5 s)


def test_coalesced_change_goes_out_after_the_interval_without_another_publish() -> None:
    a, b = book("a"), book("b")
    a.publish(0.0, target(0.0, kv_cache_usage=0.1))
    send(a, 0.0, b, 0.0)
    a.publish(0.1, target(0.1, kv_cache_usage=0.2))  # not urgent: held for the interval

    send(a, 0.2, b, 0.2)
    assert stored(b).kv_cache_usage == 0.1
    send(a, 0.5, b, 0.5)
    assert stored(b).kv_cache_usage == 0.2
    assert stored(b).last_updated == pytest.approx(0.5 - 0.4)  # read at 0.1 on a's clock


def test_snapshot_hands_a_joiner_every_known_state() -> None:
    a, b, joiner = book("a"), book("b"), book("j")
    key_b = TargetKey(model="m", node="b", endpoint="http://b:8000")
    a.publish(1.0, target(1.0))
    send(a, 1.0, b, 1.0)
    b.publish(2.0, ModelState(key=key_b, last_updated=2.0, version=5))

    snapshot = b.snapshot(3.0)

    assert sorted(e.origin for e in snapshot) == ["a", "b"]
    assert {e.origin: e.age_s for e in snapshot} == {"a": 2.0, "b": 1.0}
    assert joiner.merge(50.0, snapshot) == 2
    assert joiner.known_nodes() == ("a", "b")
    assert stored(joiner).last_updated == pytest.approx(48.0)


def test_publishing_another_nodes_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="own states"):
        book("b").publish(1.0, target(1.0))

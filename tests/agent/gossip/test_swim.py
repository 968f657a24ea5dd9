"""Deterministic tests of the SWIM/Lifeguard state machine: in-memory network, virtual time."""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
from collections.abc import Callable

import attrs
import pytest

from infermesh.agent.gossip import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Member,
    MemberEvent,
    MemberState,
    Message,
    Nack,
    Outgoing,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Swim,
    SwimConfig,
)
from infermesh.agent.gossip.broadcasts import BroadcastQueue, retransmit_limit
from infermesh.agent.gossip.config import scaled_push_pull_interval_s
from infermesh.agent.gossip.members import (
    MemberBaseline,
    MemberTable,
    ProbeRound,
    Suspicion,
    suspicion_min_timeout_s,
)

DropRule = Callable[[str, str, Message], bool]


@attrs.define
class Network:
    """N state machines, a virtual clock and a router that can drop messages or crash nodes."""

    config: SwimConfig
    seed: int
    latency_s: float = 0.002
    now: float = 0.0
    nodes: dict[str, Swim] = attrs.field(factory=dict)
    crashed: set[str] = attrs.field(factory=set)
    drop: DropRule | None = None  # datagrams it loses
    drop_streams: DropRule | None = None  # TCP messages (reliable Outgoings) it loses
    late: set[str] = attrs.field(factory=set)  # nodes whose own loop handles messages late
    late_by_s: float = 0.0
    events: list[tuple[str, MemberEvent]] = attrs.field(factory=list)
    sent: list[tuple[float, str, Outgoing]] = attrs.field(factory=list)
    _queue: list[tuple[float, int, str, Outgoing]] = attrs.field(factory=list)
    _counter: itertools.count[int] = attrs.field(factory=itertools.count)

    def add(self, node_id: str, meta: bytes = b"") -> Swim:
        rng = random.Random(f"{self.seed}-{node_id}")
        node = Swim(node_id, self.config, rng, self.now, address=f"{node_id}:7946", meta=meta)
        self.nodes[node_id] = node
        return node

    def route(self, sender: str, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            self.sent.append((self.now, sender, out))
            drop = self.drop_streams if out.reliable else self.drop
            if drop is not None and drop(sender, out.to, out.message):
                continue
            # A TCP message waits for the connection's handshake first.
            delay_s = 3 * self.latency_s if out.reliable else self.latency_s
            if out.to in self.late:
                delay_s += self.late_by_s
            heapq.heappush(self._queue, (self.now + delay_s, next(self._counter), sender, out))
        self.events += [(sender, event) for event in self.nodes[sender].drain_events()]

    def run_until(self, end_s: float) -> None:
        while True:
            live = [n for node_id, n in self.nodes.items() if node_id not in self.crashed]
            next_tick_s = min(n.next_deadline_s for n in live)
            next_message_s = self._queue[0][0] if self._queue else math.inf
            step_s = min(next_tick_s, next_message_s)
            if step_s > end_s:
                self.now = end_s
                return
            self.now = step_s
            if next_message_s <= next_tick_s:
                _, _, sender, out = heapq.heappop(self._queue)
                if out.to in self.nodes and out.to not in self.crashed:
                    replies = self.nodes[out.to].receive(self.now, sender, out.message)
                    if out.reliable and isinstance(out.message, Ping):
                        # The ack of a TCP ping goes back on the same connection.
                        replies = [
                            attrs.evolve(r, reliable=True)
                            if r.to == sender and isinstance(r.message, Ack)
                            else r
                            for r in replies
                        ]
                    self.route(out.to, replies)
                continue
            for node in live:
                if node.next_deadline_s <= self.now:
                    self.route(node.self_id, node.tick(self.now))

    def states_of(self, member_id: str) -> dict[str, MemberState | None]:
        return {
            node_id: node.state_of(member_id)
            for node_id, node in self.nodes.items()
            if node_id not in self.crashed and node_id != member_id
        }

    def first_event(self, kind: str, member_id: str) -> float | None:
        times = [e.at_s for _, e in self.events if e.kind == kind and e.member_id == member_id]
        return min(times, default=None)


def converged_network(size: int, seed: int = 7, config: SwimConfig | None = None) -> Network:
    network = Network(config or SwimConfig.lan(), seed)
    for index in range(size):
        network.add(f"n{index}")
    for index in range(1, size):
        network.route(f"n{index}", network.nodes[f"n{index}"].join(network.now, ["n0"]))
    network.run_until(5.0)
    return network


def test_join_via_a_seed_converges_to_full_membership() -> None:
    network = converged_network(10)

    for node in network.nodes.values():
        assert {m.member_id: m.state for m in node.members.values()} == {
            f"n{i}": MemberState.ALIVE for i in range(10)
        }
    assert not [e for _, e in network.events if e.kind != "joined"]


@pytest.mark.parametrize("seed", [1, 7, 24])
def test_a_failed_node_is_declared_dead_by_all_within_the_suspicion_bound(seed: int) -> None:
    size = 10
    network = converged_network(size, seed)
    config = network.config
    crashed_at_s = network.now
    network.crashed.add("n5")
    min_timeout_s = suspicion_min_timeout_s(config.suspicion_mult, size, config.probe_interval_s)
    max_timeout_s = min_timeout_s * config.suspicion_max_timeout_mult
    # Worst case: probed last of this round and of the next, then the full (unconfirmed) timeout.
    bound_s = crashed_at_s + 2 * (size - 1) * config.probe_interval_s + max_timeout_s

    network.run_until(bound_s)

    assert set(network.states_of("n5").values()) == {MemberState.DEAD}
    first_suspect_s = network.first_event("suspect", "n5")
    first_dead_s = network.first_event("dead", "n5")
    assert first_suspect_s is not None
    assert first_dead_s is not None
    assert first_dead_s - first_suspect_s >= min_timeout_s
    # Independent confirmations from the other nine shrink the timeout well below its maximum.
    assert first_dead_s - first_suspect_s < max_timeout_s / 2
    others = {e.member_id for _, e in network.events if e.kind in ("suspect", "dead")}
    assert others == {"n5"}


@pytest.mark.parametrize("seed", [1, 7, 24])
def test_a_slow_but_alive_node_refutes_and_is_never_declared_dead(seed: int) -> None:
    network = converged_network(8, seed)

    # For thirty probe intervals n3 hears everything but all its answers are lost, so every
    # probe of it fails and refutations piggybacked on its acks are lost; gossip still carries them.
    def drop_n3_answers(sender: str, to: str, message: Message) -> bool:
        return sender == "n3" and isinstance(message, Ack | Nack)

    network.drop = network.drop_streams = drop_n3_answers
    network.run_until(network.now + 30.0)
    network.drop = network.drop_streams = None
    network.run_until(network.now + 20.0)

    assert network.first_event("suspect", "n3") is not None
    assert network.first_event("dead", "n3") is None
    assert network.nodes["n3"].incarnation >= 1
    assert set(network.states_of("n3").values()) == {MemberState.ALIVE}
    assert all(
        node.members["n3"].incarnation == network.nodes["n3"].incarnation
        for node in network.nodes.values()
    )


def test_a_dead_node_that_restarts_rejoins_with_a_higher_incarnation() -> None:
    network = converged_network(6)
    network.crashed.add("n5")
    network.run_until(network.now + 60.0)
    assert set(network.states_of("n5").values()) == {MemberState.DEAD}
    dead_incarnation = network.nodes["n1"].members["n5"].incarnation

    network.crashed.discard("n5")
    restarted = network.add("n5")  # a fresh process: incarnation 0, knows nobody
    network.route("n5", restarted.join(network.now, ["n0"]))
    network.run_until(network.now + 5.0)

    assert restarted.incarnation > dead_incarnation
    assert set(network.states_of("n5").values()) == {MemberState.ALIVE}
    assert {m.state for m in restarted.members.values()} == {MemberState.ALIVE}
    assert len(restarted.members) == 6


def test_indirect_probes_save_a_member_behind_a_broken_direct_link() -> None:
    network = converged_network(8)

    def cut_n1_n2(sender: str, to: str, message: Message) -> bool:
        return {sender, to} == {"n1", "n2"}

    network.drop = network.drop_streams = cut_n1_n2  # TCP too: only the relays can help
    network.run_until(network.now + 40.0)

    assert [e for _, e in network.events if e.kind in ("suspect", "dead")] == []
    assert any(
        isinstance(out.message, PingReq) for _, sender, out in network.sent if sender == "n1"
    )


@pytest.mark.parametrize("seed", [7, 23])
def test_graceful_leave_propagates_without_a_death(seed: int) -> None:
    network = converged_network(8, seed)
    network.route("n4", network.nodes["n4"].leave(network.now))
    network.run_until(network.now + 1.0)
    network.crashed.add("n4")  # the process exits after announcing its leave
    network.run_until(network.now + 30.0)

    assert set(network.states_of("n4").values()) == {MemberState.LEFT}
    assert network.first_event("dead", "n4") is None


def test_awareness_rises_when_acks_are_lost_and_recovers_after() -> None:
    network = converged_network(8)
    config = network.config
    n0 = network.nodes["n0"]
    assert n0.awareness == 0

    def drop_answers_to_n0(sender: str, to: str, message: Message) -> bool:
        return to == "n0" and isinstance(message, Ack | Nack)

    network.drop = network.drop_streams = drop_answers_to_n0
    window_start_s = network.now
    network.run_until(window_start_s + 20.0)

    assert n0.awareness == config.awareness_max_multiplier - 1
    # A node that thinks itself unhealthy probes less: far fewer than one probe per interval.
    indirect_rounds = (
        sum(
            1
            for at_s, sender, out in network.sent
            if sender == "n0" and at_s >= window_start_s and isinstance(out.message, PingReq)
        )
        / config.indirect_checks
    )
    assert indirect_rounds < 20.0 / config.probe_interval_s / 2

    network.drop = network.drop_streams = None
    network.run_until(network.now + 60.0)
    assert n0.awareness == 0


def test_suspicion_of_self_is_refuted_with_a_higher_incarnation() -> None:
    node = Swim("me", SwimConfig.lan(), random.Random(1), now=0.0)
    node.receive(0.0, "peer", Gossip((Alive("peer", 0),)))

    node.receive(1.0, "peer", Gossip((Suspect("me", 0, "peer"),)))

    assert node.incarnation == 1
    assert Alive("me", 1) in node.pending_broadcasts
    assert node.awareness == 1
    # An accusation about an older incarnation is already refuted: nothing changes.
    node.receive(2.0, "peer", Gossip((Suspect("me", 0, "other"),)))
    assert node.incarnation == 1


def test_dynamic_suspicion_timeout_shrinks_with_confirmations() -> None:
    suspicion = Suspicion(
        incarnation=0,
        started_s=100.0,
        min_timeout_s=4.0,
        max_timeout_s=24.0,
        expected_confirmations=2,
        first_accuser="a",
    )
    assert suspicion.deadline_s == pytest.approx(124.0)
    assert not suspicion.confirm("a")  # the first accuser does not confirm itself
    assert suspicion.confirm("b")
    assert not suspicion.confirm("b")
    assert suspicion.timeout_s == pytest.approx(24.0 - math.log(2) / math.log(3) * 20.0)
    assert suspicion.confirm("c")
    assert suspicion.timeout_s == pytest.approx(4.0)
    assert not suspicion.confirm("d")  # beyond the expected count it cannot shrink further
    assert suspicion_min_timeout_s(4.0, 100, 1.0) == pytest.approx(8.0)
    assert suspicion_min_timeout_s(4.0, 3, 1.0) == pytest.approx(4.0)


def test_broadcasts_stop_after_the_retransmit_limit() -> None:
    assert retransmit_limit(4, 10) == 8
    assert retransmit_limit(4, 1000) == 16
    queue = BroadcastQueue()
    queue.push(Alive("x", 0))
    queue.push(Alive("x", 1))  # replaces the older news about the same member
    sent = [queue.take(max_updates=8, limit=3) for _ in range(5)]
    assert sent == [(Alive("x", 1),)] * 3 + [()] * 2


def test_config_rejects_nonsense_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="probe_timeout_s"):
        SwimConfig(probe_interval_s=1.0, probe_timeout_s=2.0)
    with pytest.raises(ValueError, match="probe_interval_s"):
        SwimConfig(probe_interval_s=0.0)
    with pytest.raises(ValueError, match="self_id"):
        Swim("", SwimConfig.lan(), random.Random(0), now=0.0)
    assert SwimConfig.wan().probe_interval_s == 5.0


def test_addresses_and_metadata_reach_members_that_never_talked_to_each_other() -> None:
    network = converged_network(6)

    for node in network.nodes.values():
        for member_id in network.nodes:
            assert node.address_of(member_id) == f"{member_id}:7946"

    network.nodes["n4"].update_meta(network.now, b"zone=b")
    network.run_until(network.now + 5.0)

    for node in network.nodes.values():
        member = node.member("n4")
        assert member is not None
        assert member.meta == b"zone=b"
        assert member.state is MemberState.ALIVE
    updated = {owner for owner, e in network.events if e.kind == "updated" and e.member_id == "n4"}
    assert updated == set(network.nodes) - {"n4"}


def test_a_restarted_node_with_new_metadata_outbids_its_old_life() -> None:
    network = converged_network(5)
    old_incarnation = network.nodes["n0"].members["n3"].incarnation
    network.crashed.add("n3")

    restarted = network.add("n3", meta=b"v2")
    network.crashed.discard("n3")
    network.route("n3", restarted.join(network.now, ["n0"]))
    network.run_until(network.now + 5.0)

    assert restarted.incarnation > old_incarnation
    for node in network.nodes.values():
        member = node.member("n3")
        assert member is not None
        assert (member.meta, member.state) == (b"v2", MemberState.ALIVE)


def test_nodes_started_from_one_baseline_share_records_but_not_their_changes() -> None:
    baseline = MemberBaseline.of(
        Member(f"n{i}", 0, MemberState.ALIVE, 0.0, f"n{i}:7946") for i in range(5)
    )
    config = SwimConfig.lan()
    a = Swim.from_baseline("n0", config, random.Random(1), 10.0, baseline)
    b = Swim.from_baseline("n1", config, random.Random(2), 10.0, baseline)
    assert a.live_count == b.live_count == 5
    assert a.address_of("n1") == "n1:7946"
    # Timers start somewhere within their period, as memberlist staggers them.
    assert 10.0 <= a.next_deadline_s <= 10.0 + config.gossip_interval_s

    a.receive(11.0, "n2", Gossip((Suspect("n3", 0, "n2"), Dead("n4", 0, "n2"))))

    assert (a.state_of("n3"), a.state_of("n4"), a.live_count) == (
        MemberState.SUSPECT,
        MemberState.DEAD,
        4,
    )
    assert (b.state_of("n3"), b.state_of("n4"), b.live_count) == (
        MemberState.ALIVE,
        MemberState.ALIVE,
        5,
    )
    assert baseline.records["n3"].state is MemberState.ALIVE
    with pytest.raises(ValueError, match="not a live member"):
        Swim.from_baseline("stranger", config, random.Random(3), 0.0, baseline)


def test_member_table_counts_live_members_as_records_are_replaced() -> None:
    table = MemberTable(Member(f"m{i}", 0, MemberState.ALIVE, 0.0) for i in range(4))
    table.put(table["m1"].with_state(MemberState.DEAD, 0, 1.0))
    table.put(table["m2"].with_state(MemberState.SUSPECT, 0, 1.0))  # suspects still count
    table.put(Member("m9", 3, MemberState.LEFT, 2.0))
    assert (table.live_count, len(table)) == (3, 5)
    table.put(table["m1"].with_state(MemberState.ALIVE, 1, 3.0))
    assert table.live_count == 4
    assert [table.at(i).member_id for i in range(5)] == ["m0", "m1", "m2", "m3", "m9"]


def test_member_table_samples_uniformly_and_finds_the_few_live_among_many_dead() -> None:
    rng = random.Random(5)
    table = MemberTable(Member(f"m{i}", 0, MemberState.ALIVE, 0.0) for i in range(50))
    picks = [table.sample(rng, 3, lambda m: m.member_id != "m0") for _ in range(5000)]
    assert all(len(set(p)) == 3 and "m0" not in p for p in picks)
    counts = collections.Counter(member for p in picks for member in p)
    assert set(counts) == {f"m{i}" for i in range(1, 50)}
    assert max(counts.values()) < 1.3 * min(counts.values())

    mostly_dead = MemberTable(
        Member(f"d{i}", 0, MemberState.DEAD if i >= 4 else MemberState.ALIVE, 0.0)
        for i in range(2000)
    )
    alive = sorted(mostly_dead.sample(rng, 10, lambda m: not m.is_gone))
    assert alive == ["d0", "d1", "d2", "d3"]


def test_probe_round_draws_every_index_once_including_ones_added_mid_round() -> None:
    rng = random.Random(9)
    probe_round = ProbeRound()
    drawn = [probe_round.draw(rng, 10) for _ in range(6)]
    drawn += [probe_round.draw(rng, 12) for _ in range(6)]  # two members learned meanwhile
    assert sorted(i for i in drawn if i is not None) == list(range(12))
    assert probe_round.draw(rng, 12) is None
    probe_round.restart()
    second = [probe_round.draw(rng, 12) for _ in range(12)]
    assert sorted(i for i in second if i is not None) == list(range(12))
    assert second != drawn  # a fresh order each round


def test_broadcast_queue_sends_least_sent_then_newest_first() -> None:
    rng = random.Random(4)
    queue = BroadcastQueue()
    reference: dict[str, list[int]] = {}  # member -> [transmits, order]
    order = 0
    for step in range(2000):
        if rng.random() < 0.4:
            member = f"m{rng.randrange(30)}"
            order += 1
            queue.push(Alive(member, step))
            reference[member] = [0, order, step]
        else:
            limit = rng.randrange(2, 6)
            chosen = sorted(reference.items(), key=lambda item: (item[1][0], -item[1][1]))[:4]
            expected = tuple(Alive(member, state[2]) for member, state in chosen)
            for member, state in chosen:
                state[0] += 1
                if state[0] >= limit:
                    del reference[member]
            assert queue.take(4, limit) == expected
    assert len(queue) == len(reference)


def test_a_failed_probe_of_a_suspect_confirms_the_suspicion_and_shortens_it() -> None:
    config = SwimConfig.lan()
    node = Swim("me", config, random.Random(3), now=0.0)
    node.receive(0.0, "b", Gossip(tuple(Alive(peer, 0) for peer in ("b", "c", "d", "x"))))
    node.receive(0.5, "b", Gossip((Suspect("x", 0, "b"),)))
    min_s = suspicion_min_timeout_s(config.suspicion_mult, 5, config.probe_interval_s)
    unconfirmed_deadline_s = 0.5 + min_s * config.suspicion_max_timeout_mult

    # Everyone but x answers; x never does, and no relay answers for it either.
    now = 0.5
    while node.state_of("x") is MemberState.SUSPECT and now < unconfirmed_deadline_s + 1.0:
        now = node.next_deadline_s
        for out in node.tick(now):
            if isinstance(out.message, Ping) and out.message.target != "x":
                node.receive(now, out.to, Ack(out.message.seq))
    dead = [e for e in node.drain_events() if e.kind == "dead" and e.member_id == "x"]

    assert dead, "x must be declared dead"
    # Our own failed probe was a second, independent accusation: the timeout shrank.
    assert dead[0].at_s < unconfirmed_deadline_s - 1.0


@pytest.mark.parametrize("tcp_fallback_ping", [True, False])
def test_a_member_that_only_loses_udp_is_not_suspected_thanks_to_the_tcp_fallback_ping(
    tcp_fallback_ping: bool,
) -> None:
    config = attrs.evolve(SwimConfig.lan(), tcp_fallback_ping=tcp_fallback_ping)
    network = converged_network(6, config=config)

    # Every datagram to n2 is lost (a firewall dropping its inbound UDP); TCP still works.
    def udp_to_n2(sender: str, to: str, message: Message) -> bool:
        return to == "n2"

    network.drop = udp_to_n2
    network.run_until(network.now + 30.0)

    fallback_pings = [
        out
        for _, _, out in network.sent
        if out.reliable and isinstance(out.message, Ping) and out.to == "n2"
    ]
    if tcp_fallback_ping:
        assert fallback_pings
        assert network.first_event("suspect", "n2") is None
        assert set(network.states_of("n2").values()) == {MemberState.ALIVE}
    else:
        assert not fallback_pings
        assert network.first_event("suspect", "n2") is not None


def test_a_fallback_ack_completes_the_probe_like_an_indirect_ack() -> None:
    node = Swim("me", SwimConfig.lan(), random.Random(5), now=0.0)
    node.receive(0.0, "b", Gossip((Alive("b", 0), Suspect("me", 0, "b"))))
    assert node.awareness == 1  # refuting a suspicion hints that we are the slow one

    pings: list[Outgoing] = []
    while not pings:
        now = node.next_deadline_s
        pings = [o for o in node.tick(now) if isinstance(o.message, Ping)]
    [ping] = pings
    assert isinstance(ping.message, Ping)
    assert not ping.reliable
    sent_s = now
    fallback: list[Outgoing] = []
    while not fallback:  # no UDP ack comes
        now = node.next_deadline_s
        fallback = [o for o in node.tick(now) if o.reliable]
    assert fallback == [Outgoing("b", Ping(ping.message.seq, "b"), reliable=True)]
    assert now - sent_s == pytest.approx(2 * SwimConfig.lan().probe_timeout_s)  # scaled x2

    node.receive(now + 0.01, "b", Ack(ping.message.seq))
    node.tick(now + 2.0)  # past the end of the probe interval

    assert node.state_of("b") is MemberState.ALIVE
    assert node.awareness == 1  # neither a failure nor a direct success


def test_push_pull_interval_scales_with_the_cluster_like_memberlist() -> None:
    assert scaled_push_pull_interval_s(30.0, 32) == 30.0
    assert math.isclose(scaled_push_pull_interval_s(30.0, 33), 60.0)
    assert scaled_push_pull_interval_s(30.0, 1000) == 180.0
    assert scaled_push_pull_interval_s(30.0, 10_000) == 300.0


@pytest.mark.parametrize(("members", "interval_s"), [(20, 10.0), (100, 30.0)])
def test_a_node_pushes_and_pulls_less_often_in_a_larger_cluster(
    members: int, interval_s: float
) -> None:
    config = attrs.evolve(SwimConfig.lan(), push_pull_interval_s=10.0)
    baseline = MemberBaseline.of(
        Member(f"n{i}", 0, MemberState.ALIVE, 0.0, f"n{i}:7946") for i in range(members)
    )
    node = Swim.from_baseline("n0", config, random.Random(2), 0.0, baseline)

    push_pulls: list[float] = []
    while (now := node.next_deadline_s) < 3.5 * interval_s:
        for out in node.tick(now):
            if isinstance(out.message, PushPull):
                push_pulls.append(now)
            elif isinstance(out.message, Ping) and not out.reliable:
                node.receive(now, out.to, Ack(out.message.seq))  # everyone is well

    assert push_pulls[0] <= interval_s  # the first one somewhere within the period
    gaps = [later - earlier for earlier, later in itertools.pairwise(push_pulls)]
    assert gaps == pytest.approx([interval_s] * 3)


def test_random_live_peers_are_distinct_live_members_other_than_self() -> None:
    baseline = MemberBaseline.of(
        Member(f"n{i}", 0, MemberState.ALIVE, 0.0, f"n{i}:7946") for i in range(40)
    )
    node = Swim.from_baseline("n0", SwimConfig.lan(), random.Random(6), 0.0, baseline)
    gone = tuple(Dead(f"n{i}", 0, "n1") for i in range(10, 40))
    node.receive(1.0, "n1", Gossip((Suspect("n2", 0, "n1"), *gone)))

    picks = [node.random_live_peers(3) for _ in range(300)]

    assert all(len(set(p)) == 3 for p in picks)
    assert {m for p in picks for m in p} == {f"n{i}" for i in range(1, 10)}  # suspects count
    assert sorted(node.random_live_peers(50)) == sorted(f"n{i}" for i in range(1, 10))
    assert node.random_live_peers(0) == []


def test_lifeguard_slows_a_node_whose_own_loop_is_late_and_spares_the_others() -> None:
    network = converged_network(8)
    config = network.config
    n0 = network.nodes["n0"]
    # n0's event loop is overloaded: it handles every message 1.2 s late, longer than a whole
    # probe interval, so every answer it waits for looks missing although nobody is at fault.
    network.late = {"n0"}
    network.late_by_s = 1.2
    window_start_s = network.now
    highest_awareness = 0
    for second in range(1, 31):
        network.run_until(window_start_s + second)
        highest_awareness = max(highest_awareness, n0.awareness)

    # The missing nacks tell n0 that the fault is its own: it raises its awareness ...
    assert highest_awareness >= 3
    direct_probes = sum(
        1
        for at_s, sender, out in network.sent
        if sender == "n0"
        and at_s >= window_start_s
        and isinstance(out.message, Ping)
        and not out.reliable
        and out.to == out.message.target
    )
    # ... and probes far less often than the 30 times a healthy node would in 30 s ...
    assert direct_probes < 30.0 / config.probe_interval_s / 2
    # ... so its accusations stay few, each is refuted, and nobody is declared dead.
    assert not [e for _, e in network.events if e.kind == "dead"]
    assert {m.state for m in n0.members.values()} == {MemberState.ALIVE}

"""The gossip simulation: N real `Swim` state machines on a `NetworkModel`, in virtual time.

One event loop over a heap of (time, seq, node, sender, message, by_stream): message deliveries
and each node's next tick deadline (`Swim.next_deadline_s`), so a node is ticked only when
something of its own is due. It never reads a clock: wall time and memory are the caller's to
measure.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
import random
from collections.abc import Sequence

import attrs

from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.members import Member, MemberBaseline, MemberState
from infermesh.agent.gossip.messages import Ack, Message, Outgoing, Ping, PushPull
from infermesh.agent.gossip.swim import Swim
from infermesh.dev.sim.network import PROFILES, NetworkModel
from infermesh.dev.sim.sizes import MessageSizer
from infermesh.dev.sim.watch import FailureOutcome, FalsePositives, JoinOutcome, Watch

__all__ = [
    "GossipSimResult",
    "GossipSimSettings",
    "Traffic",
    "run_gossip_sim",
]

# Probe intervals of quiet running before the join and the crash happen.
WARMUP_PROBE_INTERVALS = 5
# A from-scratch bootstrap gives up converging after this long (virtual time).
BOOTSTRAP_LIMIT_S = 300.0
BOOTSTRAPS = ("baseline", "join")
MAX_JOIN_BOOTSTRAP_NODES = 1000

# (at_s, seq, node index, sender, message, by_stream); a tick has no sender nor message.
_Event = tuple[float, int, int, str | None, Message | None, bool]


@attrs.frozen
class GossipSimSettings:
    """What to simulate: `nodes` in all (one of them joins), `duration_s` after the events."""

    nodes: int
    duration_s: float
    seed: int
    loss: float = 0.0
    profile: str = "lan"
    latency_s: float | None = None  # one-way; None = the profile's
    jitter_s: float | None = None  # +/- uniform; None = the profile's
    bootstrap: str = "baseline"  # converged baseline, or everyone joins through one seed
    sample_every: int = 64  # encode every n-th message of each type to measure bytes

    def __attrs_post_init__(self) -> None:
        if self.nodes < 4:
            raise ValueError(
                f"nodes must be >= 4 (a seed, a crash, a joiner, an observer), got {self.nodes}"
            )
        if not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 seconds, got {self.duration_s}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
        if self.bootstrap not in BOOTSTRAPS:
            raise ValueError(f"bootstrap must be one of {', '.join(BOOTSTRAPS)}")
        if self.bootstrap == "join" and self.nodes > MAX_JOIN_BOOTSTRAP_NODES:
            raise ValueError(
                f"bootstrap 'join' replays every join (O(N^2)); use it with at most "
                f"{MAX_JOIN_BOOTSTRAP_NODES} nodes, or the converged 'baseline'"
            )

    def network(self) -> NetworkModel:
        profile = PROFILES[self.profile]
        return NetworkModel(
            latency_s=profile.latency_s if self.latency_s is None else self.latency_s,
            jitter_s=profile.jitter_s if self.jitter_s is None else self.jitter_s,
            loss=self.loss,
        )

    def swim_config(self) -> SwimConfig:
        """The profile's memberlist defaults (`Swim` scales push-pull with N by itself)."""
        return SwimConfig.wan() if self.profile == "wan" else SwimConfig.lan()


@attrs.frozen
class Traffic:
    """Messages sent during the measured window (bootstrap excluded), all nodes together."""

    simulated_s: float
    messages: int
    lost: int  # dropped by the network's loss
    bytes: float
    bytes_method: str  # "codec-sample" | "field-estimate"
    by_type: dict[str, dict[str, float]]  # type -> messages, lost, mean_bytes, sampled


@attrs.frozen
class GossipSimResult:
    settings: GossipSimSettings
    network: NetworkModel
    config: SwimConfig
    bootstrap_s: float  # virtual time the bootstrap took (0 for the baseline)
    bootstrap_converged: bool
    join: JoinOutcome
    failure: FailureOutcome
    false_positives: FalsePositives
    traffic: Traffic


def _node_id(index: int) -> str:
    return f"node-{index:05d}"


def _address(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}:7946"


def _meta(index: int) -> bytes:
    """Metadata like an agent's: roles, zone and API addresses (codec-encoded when available)."""
    host = _address(index).rsplit(":", 1)[0]
    try:
        from infermesh.agent.gossip.codec import encode_meta
        from infermesh.agent.gossip.values import NodeMeta
    except ImportError:
        return b"m" * 64
    return encode_meta(
        NodeMeta(
            node=_node_id(index),
            roles=("agent",),
            zone=f"zone-{index % 3}",
            apis=(("agent", f"{host}:9000"), ("router", f"{host}:8000")),
        )
    )


class GossipSimulation:
    """N nodes, the network between them, and the heap that orders everything in virtual time."""

    def __init__(self, settings: GossipSimSettings) -> None:
        self.settings = settings
        self.config = settings.swim_config()
        self.network = settings.network()
        self.now = 0.0
        self._rng = random.Random(f"network/{settings.seed}")
        count = settings.nodes
        self._ids = [_node_id(index) for index in range(count)]
        self._addresses = [_address(index) for index in range(count)]
        self._index = {name: index for index, name in enumerate(self._ids)}
        self._index.update({address: index for index, address in enumerate(self._addresses)})
        self._nodes: list[Swim | None] = [None] * count
        self._down = bytearray(count)
        self._scheduled = [math.inf] * count
        self._heap: list[_Event] = []
        self._seq = itertools.count()
        self._sizer: MessageSizer | None = None
        self._sent_by_type: dict[str, int] = {}
        self._lost_by_type: dict[str, int] = {}
        self.watch = Watch(self._ids)

    # --------------------------------------------------------------- nodes
    def _node_rng(self, index: int) -> random.Random:
        return random.Random(f"{self.settings.seed}/{self._ids[index]}")

    def start_baseline(self, indices: Sequence[int]) -> None:
        """Nodes `indices` start at `now` as members of a converged cluster of exactly them."""
        baseline = MemberBaseline.of(
            Member(
                self._ids[index],
                0,
                MemberState.ALIVE,
                self.now,
                self._addresses[index],
                _meta(index),
            )
            for index in indices
        )
        for index in indices:
            node = Swim.from_baseline(
                self._ids[index], self.config, self._node_rng(index), self.now, baseline
            )
            self._nodes[index] = node
            self._reschedule(index, node)

    def start_joining(self, index: int, seed_index: int) -> None:
        """Node `index` starts now, knowing nobody, and joins through `seed_index`'s address."""
        node = Swim(
            self._ids[index],
            self.config,
            self._node_rng(index),
            self.now,
            address=self._addresses[index],
            meta=_meta(index),
        )
        self._nodes[index] = node
        self._route(index, node, node.join(self.now, [self._addresses[seed_index]]))

    def crash(self, index: int) -> None:
        """The process dies: it stops ticking and everything sent to it is lost."""
        self._down[index] = 1

    def live_counts(self) -> list[int]:
        return [
            node.live_count
            for index, node in enumerate(self._nodes)
            if node is not None and not self._down[index]
        ]

    # ----------------------------------------------------------- measuring
    def start_measuring(self) -> None:
        self._sizer = MessageSizer(self.settings.sample_every)
        self._sent_by_type.clear()
        self._lost_by_type.clear()
        self.watch.start_counting()

    def traffic(self, simulated_s: float) -> Traffic:
        sizer = self._sizer
        if sizer is None:
            raise RuntimeError("traffic() before start_measuring()")
        by_type = {
            kind: {
                "messages": measured.messages,
                "lost": self._lost_by_type.get(kind, 0),
                "mean_bytes": round(measured.mean_bytes, 1),
                "sampled": measured.sampled,
            }
            for kind, measured in sizer.traffic().items()
        }
        return Traffic(
            simulated_s=simulated_s,
            messages=sum(self._sent_by_type.values()),
            lost=sum(self._lost_by_type.values()),
            bytes=sum(measured.bytes for measured in sizer.traffic().values()),
            bytes_method=sizer.method,
            by_type=by_type,
        )

    # ----------------------------------------------------------- event loop
    def run_until(self, end_s: float) -> None:
        heap = self._heap
        nodes = self._nodes
        down = self._down
        scheduled = self._scheduled
        while heap and heap[0][0] <= end_s:
            at_s, _, index, sender, message, by_stream = heapq.heappop(heap)
            if down[index]:
                continue
            node = nodes[index]
            if node is None:
                continue
            if message is None:
                if scheduled[index] != at_s:
                    continue  # superseded by a later reschedule
                scheduled[index] = math.inf
                self.now = at_s
                self._route(index, node, node.tick(at_s))
            else:
                assert sender is not None
                self.now = at_s
                out = node.receive(at_s, sender, message)
                # The ack of a TCP ping goes back on the ping's connection, as the agent does.
                answer_by_stream = sender if by_stream and isinstance(message, Ping) else None
                self._route(index, node, out, answer_by_stream)
        self.now = max(self.now, end_s)

    def _route(
        self, index: int, node: Swim, out: list[Outgoing], answer_by_stream: str | None = None
    ) -> None:
        """Deliver `out` through the network model. Stream messages (push-pull, TCP pings and
        acks on their connections) are never lost; datagrams are lost at the loss rate."""
        now = self.now
        if out:
            heap = self._heap
            sender = node.self_id
            sizer = self._sizer
            network, rng = self.network, self._rng
            for outgoing in out:
                message = outgoing.message
                reply = (
                    answer_by_stream is not None
                    and outgoing.to == answer_by_stream
                    and isinstance(message, Ack)
                )
                by_stream = outgoing.reliable or reply
                if sizer is not None:
                    kind = _kind(message, by_stream)
                    self._sent_by_type[kind] = self._sent_by_type.get(kind, 0) + 1
                    sizer.observe(sender, self._addresses[index], message, kind=kind)
                target = self._index.get(outgoing.to)
                if target is None:
                    continue
                if reply:
                    delay_s: float | None = network.stream_reply_delay_s(rng)
                elif by_stream or isinstance(message, PushPull):
                    delay_s = network.stream_delay_s(rng)
                else:
                    delay_s = network.datagram_delay_s(rng)
                if delay_s is None:
                    if sizer is not None:
                        kind = _kind(message, by_stream)
                        self._lost_by_type[kind] = self._lost_by_type.get(kind, 0) + 1
                    continue
                heapq.heappush(
                    heap, (now + delay_s, next(self._seq), target, sender, message, by_stream)
                )
        events = node.drain_events()
        if events:
            self.watch.observe(index, events)
        self._reschedule(index, node)

    def _reschedule(self, index: int, node: Swim) -> None:
        deadline_s = max(node.next_deadline_s, self.now)
        if deadline_s != self._scheduled[index]:
            self._scheduled[index] = deadline_s
            heapq.heappush(self._heap, (deadline_s, next(self._seq), index, None, None, False))


def _kind(message: Message, by_stream: bool) -> str:
    """The traffic key of a message: its type, with "/tcp" for a ping or ack sent by TCP."""
    name = type(message).__name__
    return f"{name}/tcp" if by_stream and not isinstance(message, PushPull) else name


def _bootstrap_by_joins(sim: GossipSimulation, members: list[int]) -> tuple[float, bool]:
    """Everyone joins through the first member, spread over one probe interval; run until all
    know all (checked every second) or the limit. Returns (virtual seconds, converged)."""
    seed_index = members[0]
    sim.start_baseline([seed_index])
    spread_s = sim.config.probe_interval_s
    for position, index in enumerate(members[1:], start=1):
        sim.run_until(spread_s * position / len(members))
        sim.start_joining(index, seed_index)
    while sim.now < BOOTSTRAP_LIMIT_S:
        sim.run_until(math.floor(sim.now) + 1.0)
        if all(count == len(members) for count in sim.live_counts()):
            return sim.now, True
    return sim.now, False


def run_gossip_sim(settings: GossipSimSettings) -> GossipSimResult:
    """Start a cluster, let it run, then one node joins through a seed while another crashes."""
    sim = GossipSimulation(settings)
    choice = random.Random(f"scenario/{settings.seed}")
    joiner = settings.nodes - 1
    members = list(range(joiner))
    seed_index = choice.choice(members)
    crashed = choice.choice([index for index in members if index != seed_index])
    if settings.bootstrap == "join":
        bootstrap_s, converged = _bootstrap_by_joins(sim, members)
    else:
        sim.start_baseline(members)
        bootstrap_s, converged = 0.0, True
    # N membership tables hold N^2 references: keep the cyclic collector from walking them
    # again and again while millions of short-lived messages come and go.
    gc.freeze()
    try:
        start_s = sim.now
        sim.start_measuring()
        sim.run_until(start_s + WARMUP_PROBE_INTERVALS * sim.config.probe_interval_s)

        event_s = sim.now
        observers = [index for index in members if index != crashed]
        sim.watch.expect_join(joiner, seed_index, event_s, observers)
        sim.watch.expect_failure(crashed, event_s, observers)
        sim.crash(crashed)
        sim.start_joining(joiner, seed_index)
        end_s = event_s + settings.duration_s
        sim.run_until(end_s)
    finally:
        gc.unfreeze()

    return GossipSimResult(
        settings=settings,
        network=sim.network,
        config=sim.config,
        bootstrap_s=bootstrap_s,
        bootstrap_converged=converged,
        join=sim.watch.join_outcome(),
        failure=sim.watch.failure_outcome(),
        false_positives=sim.watch.false_positives(),
        traffic=sim.traffic(end_s - start_s),
    )

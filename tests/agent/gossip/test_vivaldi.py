"""Vivaldi coordinates: a simulated network converges to its true RTTs; bad input is ignored."""

from __future__ import annotations

import math
import random
import statistics

import attrs
import pytest

from infermesh.agent.gossip.vivaldi import (
    MAX_RTT_S,
    Coordinate,
    NetworkMap,
    VivaldiClient,
    VivaldiConfig,
    distance_s,
    origin,
)

BASE_RTT_S = 0.001  # every pair pays at least this (a host's own stack)


@attrs.define
class SimulatedNetwork:
    """Nodes at fixed 2-D positions (seconds); RTT = distance + base, with relative noise."""

    size: int
    seed: int
    noise: float = 0.05
    positions: list[tuple[float, float]] = attrs.field(init=False)
    maps: list[NetworkMap] = attrs.field(init=False)
    rng: random.Random = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.positions = [
            (self.rng.uniform(0, 0.1), self.rng.uniform(0, 0.1)) for _ in range(self.size)
        ]
        self.maps = [
            NetworkMap(VivaldiClient(VivaldiConfig(), random.Random(f"{self.seed}-{i}")))
            for i in range(self.size)
        ]

    def true_rtt_s(self, i: int, j: int) -> float:
        return math.dist(self.positions[i], self.positions[j]) + BASE_RTT_S

    def run_rounds(self, rounds: int) -> None:
        """Each round every node probes one random peer and learns its coordinate from the ack."""
        for _ in range(rounds):
            for i in range(self.size):
                j = self.rng.randrange(self.size - 1)
                j += j >= i
                measured = self.true_rtt_s(i, j) * (1 + self.rng.uniform(-self.noise, self.noise))
                peer = self.maps[j].client.coordinate
                self.maps[i].observe(f"n{j}", peer, measured)

    def relative_errors(self) -> list[float]:
        """Every node's estimate to every other, after all have heard each other's latest."""
        for i, here in enumerate(self.maps):
            for j, there in enumerate(self.maps):
                if i != j:
                    here.update(f"n{j}", there.client.coordinate)
        errors = []
        for i, here in enumerate(self.maps):
            for j in range(self.size):
                if i != j:
                    estimate = here.rtt_s(f"n{j}")
                    assert estimate is not None
                    true = self.true_rtt_s(i, j)
                    errors.append(abs(estimate - true) / true)
        return errors


def test_simulated_network_converges_to_true_rtts() -> None:
    network = SimulatedNetwork(size=16, seed=7)
    network.run_rounds(10)
    early = statistics.median(network.relative_errors())
    network.run_rounds(190)
    errors = network.relative_errors()

    assert statistics.median(errors) < 0.10
    assert statistics.median(errors) < early
    assert all(m.client.ignored == 0 and m.client.resets == 0 for m in network.maps)


def test_estimates_order_near_and_far_peers_correctly() -> None:
    network = SimulatedNetwork(size=12, seed=3)
    network.run_rounds(200)
    here = network.maps[0]
    pairs = [(j, k) for j in range(1, 12) for k in range(1, 12) if j < k]
    clear = [
        (j, k)
        for j, k in pairs
        if max(network.true_rtt_s(0, j), network.true_rtt_s(0, k))
        > 2 * min(network.true_rtt_s(0, j), network.true_rtt_s(0, k))
    ]
    assert clear
    for j, k in clear:
        nearer = j if network.true_rtt_s(0, j) < network.true_rtt_s(0, k) else k
        farther = k if nearer == j else j
        assert here.rtt_s(f"n{nearer}") < here.rtt_s(f"n{farther}")  # type: ignore[operator]


def test_unknown_peer_has_no_estimate() -> None:
    network_map = NetworkMap(VivaldiClient(VivaldiConfig(), random.Random(1)))
    assert network_map.rtt_s("nobody") is None


def test_forgotten_peer_has_no_estimate() -> None:
    config = VivaldiConfig()
    network_map = NetworkMap(VivaldiClient(config, random.Random(1)))
    network_map.observe("n1", origin(config), 0.01)
    assert network_map.rtt_s("n1") is not None
    network_map.forget("n1")
    assert network_map.rtt_s("n1") is None


@pytest.mark.parametrize("rtt_s", [0.0, -0.01, MAX_RTT_S + 0.1, math.nan, math.inf])
def test_invalid_rtt_is_ignored_and_counted(rtt_s: float) -> None:
    config = VivaldiConfig()
    client = VivaldiClient(config, random.Random(1))
    before = client.coordinate
    assert client.update("n1", origin(config), rtt_s) == before
    assert client.coordinate == before
    assert client.ignored == 1


def _bad_coordinates() -> list[Coordinate]:
    good = origin(VivaldiConfig())
    return [
        attrs.evolve(good, vec=(0.0, 0.0)),  # dimensionality mismatch
        attrs.evolve(good, vec=(math.nan,) * 8),
        attrs.evolve(good, vec=(math.inf,) + (0.0,) * 7),
        attrs.evolve(good, error=math.nan),
        attrs.evolve(good, adjustment=-math.inf),
        attrs.evolve(good, height=math.nan),
        attrs.evolve(good, height=-1.0),
        attrs.evolve(good, error=-1.0),
    ]


@pytest.mark.parametrize("bad", _bad_coordinates())
def test_invalid_peer_coordinate_is_ignored_and_counted(bad: Coordinate) -> None:
    client = VivaldiClient(VivaldiConfig(), random.Random(1))
    network_map = NetworkMap(client)
    before = client.coordinate

    assert network_map.observe("n1", bad, 0.01) == before

    assert client.coordinate == before
    assert client.ignored == 1
    assert network_map.ignored == 1
    assert network_map.rtt_s("n1") is None


def test_coordinates_stay_valid_with_a_peer_at_a_huge_finite_position() -> None:
    config = VivaldiConfig()
    client = VivaldiClient(config, random.Random(1))
    far = attrs.evolve(origin(config), vec=(1e300,) * 8)
    for _ in range(5):
        coordinate = client.update("far", far, 0.01)
        assert all(math.isfinite(v) for v in coordinate.vec)
        assert math.isfinite(coordinate.height)
        assert math.isfinite(coordinate.error)
    assert client.resets > 0  # the overflowing result was thrown away, not kept


def test_two_fresh_nodes_separate_from_the_origin() -> None:
    config = VivaldiConfig()
    a = VivaldiClient(config, random.Random(1))
    b = VivaldiClient(config, random.Random(2))
    for _ in range(20):
        a.update("b", b.coordinate, 0.02)
        b.update("a", a.coordinate, 0.02)
    assert distance_s(a.coordinate, b.coordinate) == pytest.approx(0.02, rel=0.2)


def test_latency_filter_rides_out_one_outlier() -> None:
    config = VivaldiConfig()
    steady = VivaldiClient(config, random.Random(1))
    blipped = VivaldiClient(config, random.Random(1))
    peer = attrs.evolve(origin(config), vec=(0.01,) + (0.0,) * 7, error=0.1)
    for rtt_s in (0.01, 0.01, 0.01):
        steady.update("p", peer, rtt_s)
        blipped.update("p", peer, rtt_s)
    steady.update("p", peer, 0.01)
    blipped.update("p", peer, 2.0)  # one blip: the median of the last three is still 0.01
    assert blipped.coordinate == steady.coordinate


def test_distance_between_mismatched_dimensions_raises() -> None:
    a = origin(VivaldiConfig(dimensionality=2))
    b = origin(VivaldiConfig(dimensionality=3))
    with pytest.raises(ValueError, match="dimensionality"):
        distance_s(a, b)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="dimensionality"):
        VivaldiConfig(dimensionality=0)
    with pytest.raises(ValueError, match="gravity_rho"):
        VivaldiConfig(gravity_rho=math.nan)

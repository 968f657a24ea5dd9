"""Vivaldi network coordinates as HashiCorp Serf computes them (hashicorp/serf/coordinate).

Sans-I/O: a client turns (peer coordinate, measured RTT) into its own coordinate, and a map
estimates the RTT to any peer whose coordinate it has heard. It never reads a clock, sends
anything or raises on a peer's input: bad RTTs and coordinates are ignored and counted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import attrs

from infermesh.agent.gossip.values import Coordinate

__all__ = [
    "MAX_RTT_S",
    "Coordinate",
    "NetworkMap",
    "VivaldiClient",
    "VivaldiConfig",
    "distance_s",
    "is_valid",
    "origin",
]

MAX_RTT_S = 10.0
"""An RTT above this is not a measurement of the network (Serf's maxRTT)."""
# Below this two positions coincide and no direction can be derived from them (Serf's value).
_ZERO_THRESHOLD = 1.0e-6


def _positive(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"vivaldi {attribute.name} must be a finite number > 0, got {value!r}")


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if value < minimum:
            raise ValueError(f"vivaldi {attribute.name} must be >= {minimum}, got {value!r}")

    return check


@attrs.frozen
class VivaldiConfig:
    """Serf's tuning parameters and defaults (coordinate.DefaultConfig).

    `dimensionality` Euclidean dimensions plus a non-Euclidean height; `vivaldi_error_max` is the
    error of a coordinate that has observed nothing (and the cap on it); `vivaldi_ce` and
    `vivaldi_cc` bound how much one observation moves the error and the position;
    `adjustment_window_size` samples average into the adjustment term (0 disables it);
    `latency_filter_size` RTT samples per peer feed a moving median; `gravity_rho` sets how
    strongly coordinates are pulled back to the origin against drift.
    """

    dimensionality: int = attrs.field(default=8, validator=_at_least(1))
    vivaldi_error_max: float = attrs.field(default=1.5, validator=_positive)
    vivaldi_ce: float = attrs.field(default=0.25, validator=_positive)
    vivaldi_cc: float = attrs.field(default=0.25, validator=_positive)
    adjustment_window_size: int = attrs.field(default=20, validator=_at_least(0))
    height_min: float = attrs.field(default=10.0e-6, validator=_positive)
    latency_filter_size: int = attrs.field(default=3, validator=_at_least(1))
    gravity_rho: float = attrs.field(default=150.0, validator=_positive)


def origin(config: VivaldiConfig) -> Coordinate:
    """A coordinate that has observed nothing: at the origin, with the maximum error."""
    return Coordinate(
        vec=(0.0,) * config.dimensionality,
        error=config.vivaldi_error_max,
        adjustment=0.0,
        height=config.height_min,
    )


def is_valid(coordinate: Coordinate) -> bool:
    """Every component finite, and error and height not negative (they never are in Vivaldi)."""
    values = (*coordinate.vec, coordinate.error, coordinate.adjustment, coordinate.height)
    if not all(math.isfinite(v) for v in values):
        return False
    return coordinate.error >= 0.0 and coordinate.height >= 0.0


def _raw_distance_s(a: Coordinate, b: Coordinate) -> float:
    """Euclidean distance plus both heights, without the adjustment terms."""
    return math.dist(a.vec, b.vec) + a.height + b.height


def distance_s(a: Coordinate, b: Coordinate) -> float:
    """Estimated RTT between two coordinates, in seconds, with the adjustment terms.

    The adjustments are left out when they would make the estimate non-positive (as Serf does).
    Raises ValueError when the dimensionalities differ.
    """
    if len(a.vec) != len(b.vec):
        raise ValueError(f"coordinate dimensionality does not match ({len(a.vec)} vs {len(b.vec)})")
    raw = _raw_distance_s(a, b)
    adjusted = raw + a.adjustment + b.adjustment
    return adjusted if adjusted > 0.0 else raw


def _unit_vector_at(
    vec1: Sequence[float], vec2: Sequence[float], rng: random.Random
) -> tuple[tuple[float, ...], float]:
    """The unit vector pointing at vec1 from vec2, and their distance.

    Coinciding points get a random direction (distance 0), so two fresh nodes can separate.
    """
    diff = [x - y for x, y in zip(vec1, vec2, strict=True)]
    magnitude = math.hypot(*diff)
    if magnitude > _ZERO_THRESHOLD:
        return tuple(d / magnitude for d in diff), magnitude
    diff = [rng.random() - 0.5 for _ in diff]
    magnitude = math.hypot(*diff)
    if magnitude > _ZERO_THRESHOLD:
        return tuple(d / magnitude for d in diff), 0.0
    return (1.0,) + (0.0,) * (len(diff) - 1), 0.0


def _apply_force(
    config: VivaldiConfig,
    rng: random.Random,
    coordinate: Coordinate,
    force_s: float,
    other: Coordinate,
) -> Coordinate:
    """`coordinate` pushed `force_s` away from `other` (pulled toward it when negative)."""
    unit, magnitude = _unit_vector_at(coordinate.vec, other.vec, rng)
    vec = tuple(v + u * force_s for v, u in zip(coordinate.vec, unit, strict=True))
    height = coordinate.height
    if magnitude > _ZERO_THRESHOLD:
        height = (height + other.height) * force_s / magnitude + height
        height = max(height, config.height_min)
    return attrs.evolve(coordinate, vec=vec, height=height)


class VivaldiClient:
    """This node's coordinate, moved by every RTT observation to a peer (Serf's Client.Update).

    An observation is filtered (median of the peer's last `latency_filter_size` RTTs), moves the
    error estimate and the position in proportion to this node's share of the total error,
    updates the adjustment window, then applies a little gravity toward the origin. A result
    that is not finite resets the coordinate (`resets`). A bad observation (RTT not in
    (0, MAX_RTT_S], a coordinate with the wrong dimensionality or non-finite values) changes
    nothing and is counted in `ignored`.
    """

    def __init__(self, config: VivaldiConfig, rng: random.Random) -> None:
        self.config = config
        self._rng = rng
        self._coordinate = origin(config)
        self._origin = origin(config)
        self._adjustment_samples = [0.0] * config.adjustment_window_size
        self._adjustment_index = 0
        self._latency_samples: dict[str, list[float]] = {}
        self.ignored = 0
        self.resets = 0

    @property
    def coordinate(self) -> Coordinate:
        return self._coordinate

    def compatible(self, other: Coordinate) -> bool:
        """Whether `other` can be compared with this node's coordinate and is valid."""
        return len(other.vec) == self.config.dimensionality and is_valid(other)

    def forget(self, peer: str) -> None:
        """Drop the RTT samples of a peer that left (its next life starts a fresh filter)."""
        self._latency_samples.pop(peer, None)

    def distance_s(self, other: Coordinate) -> float:
        """Estimated RTT from this node to `other` (ValueError if dimensionalities differ)."""
        return distance_s(self._coordinate, other)

    def update(self, peer: str, peer_coordinate: Coordinate, rtt_s: float) -> Coordinate:
        """Fold one RTT measurement to `peer` (at `peer_coordinate`) in; returns the coordinate."""
        if not self.compatible(peer_coordinate) or not (0.0 < rtt_s <= MAX_RTT_S):
            self.ignored += 1
            return self._coordinate
        filtered_s = self._latency_filter(peer, rtt_s)
        self._update_vivaldi(peer_coordinate, filtered_s)
        self._update_adjustment(peer_coordinate, filtered_s)
        self._update_gravity()
        if not is_valid(self._coordinate):
            self.resets += 1
            self._coordinate = origin(self.config)
        return self._coordinate

    def _latency_filter(self, peer: str, rtt_s: float) -> float:
        samples = self._latency_samples.setdefault(peer, [])
        samples.append(rtt_s)
        if len(samples) > self.config.latency_filter_size:
            del samples[0]
        ordered = sorted(samples)
        return ordered[len(ordered) // 2]

    def _update_vivaldi(self, other: Coordinate, rtt_s: float) -> None:
        config = self.config
        mine = self._coordinate
        dist_s = distance_s(mine, other)
        rtt_s = max(rtt_s, _ZERO_THRESHOLD)
        wrongness = abs(dist_s - rtt_s) / rtt_s
        total_error = max(mine.error + other.error, _ZERO_THRESHOLD)
        weight = mine.error / total_error
        error = config.vivaldi_ce * weight * wrongness + mine.error * (
            1.0 - config.vivaldi_ce * weight
        )
        mine = attrs.evolve(mine, error=min(error, config.vivaldi_error_max))
        force_s = config.vivaldi_cc * weight * (rtt_s - dist_s)
        self._coordinate = _apply_force(config, self._rng, mine, force_s, other)

    def _update_adjustment(self, other: Coordinate, rtt_s: float) -> None:
        window = self.config.adjustment_window_size
        if window == 0:
            return
        # The existing adjustments do not figure in: the window learns what they should be.
        self._adjustment_samples[self._adjustment_index] = rtt_s - _raw_distance_s(
            self._coordinate, other
        )
        self._adjustment_index = (self._adjustment_index + 1) % window
        adjustment = sum(self._adjustment_samples) / (2.0 * window)
        self._coordinate = attrs.evolve(self._coordinate, adjustment=adjustment)

    def _update_gravity(self) -> None:
        dist_s = distance_s(self._origin, self._coordinate)
        ratio = dist_s / self.config.gravity_rho
        force_s = -1.0 * ratio * ratio  # overflows to inf (then a reset), never raises
        self._coordinate = _apply_force(
            self.config, self._rng, self._coordinate, force_s, self._origin
        )


class NetworkMap:
    """The coordinates of the peers this node has heard, and RTT estimates from this node.

    This node's own coordinate is always the client's current one. A peer coordinate that the
    client cannot use (wrong dimensionality, non-finite) is not stored and counted in `ignored`.
    """

    def __init__(self, client: VivaldiClient) -> None:
        self.client = client
        self._coordinates: dict[str, Coordinate] = {}
        self.ignored = 0

    def __len__(self) -> int:
        return len(self._coordinates)

    def update(self, node: str, coordinate: Coordinate) -> None:
        """Remember `node`'s latest coordinate (as heard in an ack or push-pull)."""
        if not self.client.compatible(coordinate):
            self.ignored += 1
            return
        self._coordinates[node] = coordinate

    def observe(self, node: str, coordinate: Coordinate, rtt_s: float) -> Coordinate:
        """A measured RTT to `node`: move this node's coordinate and remember the peer's."""
        self.update(node, coordinate)
        return self.client.update(node, coordinate, rtt_s)

    def forget(self, node: str) -> None:
        """Drop everything known about `node` (it left or died)."""
        self._coordinates.pop(node, None)
        self.client.forget(node)

    def coordinate_of(self, node: str) -> Coordinate | None:
        return self._coordinates.get(node)

    def rtt_s(self, node: str) -> float | None:
        """Estimated RTT to `node` in seconds; None while its coordinate is unknown."""
        coordinate = self._coordinates.get(node)
        if coordinate is None:
            return None
        return self.client.distance_s(coordinate)

"""Values the gossip layers exchange besides membership: node-state entries and coordinates.

Frozen attrs classes only, shared by the codec, the state book and the Vivaldi client so none of
them depends on another's internals.
"""

from __future__ import annotations

import attrs

from infermesh.core.model import GpuState, ModelState

__all__ = ["Coordinate", "NodeMeta", "StateEntry"]


@attrs.frozen
class StateEntry:
    """One node's full state of one target or GPU, as gossip carries it.

    `version` is the origin's gossip version (newest wins); `age_s` is how old the reading was
    when this entry was sent, so a receiver stores `last_updated = now - age_s` with its own clock
    and never compares clocks across nodes.
    """

    origin: str
    state: ModelState | GpuState
    version: int
    age_s: float


@attrs.frozen
class Coordinate:
    """A Vivaldi network coordinate (hashicorp/serf/coordinate): seconds in every unit."""

    vec: tuple[float, ...]
    error: float
    adjustment: float
    height: float


@attrs.frozen
class NodeMeta:
    """What a member says about itself: carried as `Alive.meta` (encoded by the codec).

    `apis` maps an API name (`scoring`, `metrics`, `router`, ...) to the address it listens on;
    `runtimes` lists the base URLs of the runtimes this node's agent watches.
    """

    node: str
    roles: tuple[str, ...] = ()
    zone: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    apis: tuple[tuple[str, str], ...] = ()
    runtimes: tuple[str, ...] = ()

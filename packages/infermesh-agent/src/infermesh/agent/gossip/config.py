"""SWIM/Lifeguard parameters with memberlist's LAN and WAN profiles.

A frozen value checked when built; it never reads files or the environment (the agent config does).
"""

from __future__ import annotations

import math
from typing import Any

import attrs

__all__ = ["PUSH_PULL_SCALE_THRESHOLD", "SwimConfig", "scaled_push_pull_interval_s"]

# memberlist scales the push-pull interval with the cluster size above this many members.
PUSH_PULL_SCALE_THRESHOLD = 32


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"SwimConfig.{attribute.name} must be > 0, got {value!r}")


@attrs.frozen
class SwimConfig:
    """SWIM/Lifeguard parameters; the defaults are hashicorp/memberlist's LAN profile."""

    probe_interval_s: float = attrs.field(default=1.0, validator=_positive)
    probe_timeout_s: float = attrs.field(default=0.5, validator=_positive)
    indirect_checks: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    suspicion_mult: float = attrs.field(default=4.0, validator=_positive)
    suspicion_max_timeout_mult: float = attrs.field(default=6.0, validator=_positive)
    gossip_nodes: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    gossip_interval_s: float = attrs.field(default=0.2, validator=_positive)
    gossip_to_the_dead_s: float = 30.0
    retransmit_mult: int = attrs.field(default=4, validator=_positive)
    push_pull_interval_s: float = attrs.field(default=30.0, validator=_positive)
    awareness_max_multiplier: int = attrs.field(default=8, validator=_positive)
    max_piggyback_updates: int = attrs.field(default=8, validator=_positive)
    # memberlist's TCP fallback ping: when the direct probe times out, also ping over TCP (a
    # member whose UDP is lost but whose TCP works is then not suspected).
    tcp_fallback_ping: bool = True

    def __attrs_post_init__(self) -> None:
        if self.probe_timeout_s > self.probe_interval_s:
            raise ValueError(
                f"SwimConfig.probe_timeout_s ({self.probe_timeout_s}) must not exceed "
                f"probe_interval_s ({self.probe_interval_s})"
            )

    @classmethod
    def lan(cls) -> SwimConfig:
        return cls()

    @classmethod
    def wan(cls) -> SwimConfig:
        """memberlist's WAN profile."""
        return cls(
            probe_interval_s=5.0,
            probe_timeout_s=3.0,
            suspicion_mult=6.0,
            gossip_nodes=4,
            gossip_interval_s=0.5,
            push_pull_interval_s=60.0,
        )


def scaled_push_pull_interval_s(base_s: float, cluster_size: int) -> float:
    """memberlist's pushPullScale: `base_s` x (ceil(log2 N - log2 32) + 1) above 32 members, so
    full-state exchanges (whose size grows with N) cost each node about the same bytes/s."""
    if cluster_size <= PUSH_PULL_SCALE_THRESHOLD:
        return base_s
    steps = math.ceil(math.log2(cluster_size) - math.log2(PUSH_PULL_SCALE_THRESHOLD))
    return base_s * (steps + 1)

"""SWIM/Lifeguard gossip membership for InferMesh agents.

`swim.Swim` is the sans-I/O state machine; `node.GossipNode` joins it to the node-state book,
Vivaldi, codec and keyring without I/O; `service.GossipService` runs a node on real sockets.
Transports and codecs wrap the state machine and never hold its rules. The node and service
names are imported on first use, so the state machine alone (the simulator) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.members import Member, MemberEvent, MemberState
from infermesh.agent.gossip.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Leave,
    Message,
    Nack,
    NodeSnapshot,
    Outgoing,
    Ping,
    PingReq,
    PushPull,
    Suspect,
    Update,
)
from infermesh.agent.gossip.swim import Swim

if TYPE_CHECKING:
    from infermesh.agent.gossip.node import (
        GossipCounters,
        GossipNode,
        MemberInfo,
        NodeSettings,
        Send,
    )
    from infermesh.agent.gossip.service import GossipService, GossipSettings

_LAZY = {
    "GossipCounters": "node",
    "GossipNode": "node",
    "MemberInfo": "node",
    "NodeSettings": "node",
    "Send": "node",
    "GossipService": "service",
    "GossipSettings": "service",
}

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "Gossip",
    "GossipCounters",
    "GossipNode",
    "GossipService",
    "GossipSettings",
    "Leave",
    "Member",
    "MemberEvent",
    "MemberInfo",
    "MemberState",
    "Message",
    "Nack",
    "NodeSettings",
    "NodeSnapshot",
    "Outgoing",
    "Ping",
    "PingReq",
    "PushPull",
    "Send",
    "Suspect",
    "Swim",
    "SwimConfig",
    "Update",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

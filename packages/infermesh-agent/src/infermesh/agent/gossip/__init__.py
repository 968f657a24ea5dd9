"""SWIM/Lifeguard gossip membership for InferMesh agents.

`swim.Swim` is the sans-I/O state machine; transports and codecs wrap it and never hold its rules.
"""

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

__all__ = [
    "Ack",
    "Alive",
    "Dead",
    "Gossip",
    "Leave",
    "Member",
    "MemberEvent",
    "MemberState",
    "Message",
    "Nack",
    "NodeSnapshot",
    "Outgoing",
    "Ping",
    "PingReq",
    "PushPull",
    "Suspect",
    "Swim",
    "SwimConfig",
    "Update",
]

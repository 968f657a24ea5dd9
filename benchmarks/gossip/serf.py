"""HashiCorp Serf members: `serf agent` command lines and what their log lines say.

Serf's LAN profile is memberlist's DefaultLANConfig (probe 1 s, probe timeout 500 ms, suspicion
multiplier 4, gossip 200 ms to 3 nodes, retransmit multiplier 4, push-pull 30 s) and its agent
has no flag for the probe interval, so the benchmark always compares against `-profile lan`.
With `-log-level=debug` every agent logs, on its own stdout:

    [INFO] serf: EventMemberJoin: n3 127.0.0.1          -> alive
    [INFO] serf: EventMemberFailed: n3 127.0.0.1        -> failed
    [INFO] serf: EventMemberLeave: n3 127.0.0.1         -> left
    [INFO] memberlist: Suspect n3 has failed, no acks received      -> suspect (the prober only)
    [INFO] memberlist: Marking n3 as failed, suspect timeout reached -> declared
    [WARN] memberlist: Refuting a suspect message (from: n5)         -> refute (about itself)

Serf has no event for a suspicion received by gossip, so `suspect` here counts the probers that
found a member unresponsive (direct, indirect and TCP fallback probes all failed), not every
member that learned of the suspicion.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from benchmarks.gossip.cluster import Command, Kind, MemberPlan, free_port

__all__ = ["SerfSystem", "find_serf", "serf_version"]

_EVENT = re.compile(r"serf: EventMember(Join|Failed|Leave): (\S+)")
_SUSPECT = re.compile(r"memberlist: Suspect (\S+) has failed")
_MARKING = re.compile(r"memberlist: Marking (\S+) as failed")
_REFUTE = re.compile(r"memberlist: Refuting an? (?:suspect|dead) message")
_EVENT_KINDS: dict[str, Kind] = {"Join": "alive", "Failed": "failed", "Leave": "left"}


def find_serf(explicit: str | None = None) -> str | None:
    """The serf executable: `explicit` when given (and runnable), else the one on PATH."""
    if explicit:
        return explicit if shutil.which(explicit) else None
    return shutil.which("serf")


def serf_version(executable: str) -> str:
    """First line of `serf version` (e.g. `Serf v0.8.2-dev`), or why it could not be read."""
    try:
        done = subprocess.run(
            [executable, "version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if lines else "unknown"


@dataclass
class SerfSystem:
    """`serf agent` members; each also needs its own RPC port (they all default to 7373)."""

    executable: str
    encrypt_key: str = ""
    """Base64 AES key for `-encrypt` (empty: plaintext gossip)."""
    profile: str = "lan"
    name: str = "serf"

    def __post_init__(self) -> None:
        self._rpc_ports: dict[MemberPlan, int] = {}

    def rpc_port(self, plan: MemberPlan) -> int:
        if plan not in self._rpc_ports:
            self._rpc_ports[plan] = free_port()
        return self._rpc_ports[plan]

    def command(self, plan: MemberPlan) -> Command:
        host, port = plan.bind
        adv_host, adv_port = plan.advertise
        argv = [
            self.executable,
            "agent",
            f"-node={plan.name}",
            f"-bind={host}:{port}",
            f"-advertise={adv_host}:{adv_port}",
            f"-rpc-addr=127.0.0.1:{self.rpc_port(plan)}",
            f"-profile={self.profile}",
            "-log-level=debug",
        ]
        if self.encrypt_key:
            argv.append(f"-encrypt={self.encrypt_key}")
        argv += [f"-join={seed}" for seed in plan.seeds]
        return Command(tuple(argv))

    def parse(self, line: str) -> tuple[Kind, str] | None:
        if match := _EVENT.search(line):
            return _EVENT_KINDS[match.group(1)], match.group(2)
        if match := _SUSPECT.search(line):
            return "suspect", match.group(1)
        if match := _MARKING.search(line):
            return "declared", match.group(1)
        if _REFUTE.search(line):
            return "refute", ""
        return None

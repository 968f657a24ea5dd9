"""Three Raft policy-store voters as real processes on loopback: a write through a follower is
readable on all three; SIGKILL of the leader → a new leader and writes succeed within 5 s;
every voter killed and restarted at once → the committed policy is still there."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from infermesh.core.policy import DrainNode, Pin, PolicyKind, SetPolicy, command_to_document
from tests.agent.policy.test_raft_store import free_ports

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

VOTER = Path(__file__).with_name("raft_voter.py")
PASSWORD = "a shared secret"
PIN = command_to_document(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1", "gpu-2"), 2)))


class Voter:
    def __init__(self, process: Process) -> None:
        self.process = process
        assert process.stdout is not None
        self.lines = BufferedByteReceiveStream(process.stdout)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None
        await self.process.stdin.send(json.dumps(request).encode() + b"\n")
        with anyio.fail_after(10):
            answer: dict[str, Any] = json.loads(await self.lines.receive_until(b"\n", 1 << 20))
        return answer


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(3)]
        self.voters: dict[str, Voter] = {}

    async def start(self) -> None:
        for address in self.addresses:
            data_dir = self.root / address.replace(":", "_")
            command = [sys.executable, str(VOTER), str(data_dir), address]
            command += [",".join(self.addresses), PASSWORD]
            voter = Voter(await anyio.open_process(command))
            with anyio.fail_after(20):
                assert json.loads(await voter.lines.receive_until(b"\n", 4096)) == {
                    "ready": address
                }
            self.voters[address] = voter

    async def kill(self, address: str) -> None:
        voter = self.voters.pop(address)
        voter.process.kill()
        await voter.process.wait()
        await voter.process.aclose()

    async def aclose(self) -> None:
        for address in list(self.voters):
            await self.kill(address)

    async def leader(self, deadline_s: float) -> str:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for address, voter in self.voters.items():
                if (await voter.ask({"op": "status"}))["role"] == "leader":
                    return address
            await anyio.sleep(0.05)
        pytest.fail(f"no leader within {deadline_s} s")

    async def write(self, address: str, command: dict[str, Any], deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            answer = await self.voters[address].ask({"op": "submit", "command": command})
            if "policy" in answer:
                return
            assert answer["error"].startswith("NotLeaderError"), answer
        pytest.fail(f"write through {address} not committed within {deadline_s} s")

    async def wait_everywhere(self, key: str, name: str, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            answers = [await v.ask({"op": "status"}) for v in self.voters.values()]
            if all(name in a["policy"].get(key, {}) for a in answers):
                return
            await anyio.sleep(0.05)
        pytest.fail(f"{key}[{name!r}] not on every voter within {deadline_s} s")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    running = Cluster(tmp_path)
    try:
        await running.start()
        yield running
    finally:
        await running.aclose()


async def test_three_voter_processes_survive_leader_kill_and_full_restart(
    cluster: Cluster,
) -> None:
    leader = await cluster.leader(deadline_s=15)
    follower = next(a for a in cluster.addresses if a != leader)
    await cluster.write(follower, PIN, deadline_s=10)
    await cluster.wait_everywhere("pins", "llama", deadline_s=10)

    await cluster.kill(leader)
    killed_at = time.monotonic()
    survivor = next(iter(cluster.voters))
    await cluster.write(survivor, command_to_document(DrainNode("gpu-1", "failover")), 5.0)
    assert time.monotonic() - killed_at < 5.0
    await cluster.wait_everywhere("drains", "gpu-1", deadline_s=10)

    await cluster.aclose()
    await cluster.start()
    await cluster.wait_everywhere("pins", "llama", deadline_s=15)
    await cluster.wait_everywhere("drains", "gpu-1", deadline_s=15)

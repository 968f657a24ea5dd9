"""The control plane with real agent processes (`infermesh agent run`): three Raft voters serving
the Control API over mutual TLS and a fourth agent that is not a voter.

Through the Control API only: the voters elect a leader; a policy set through a follower is
readable on all three; SIGKILL of the leader, then writes through a survivor succeed again
within 5 s; the non-voter sees a drain made on a voter (in its policy and its event stream), and
a drain an operator sends to the non-voter is applied through a voter; every voter stopped and
restarted keeps every committed policy.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.tls import channel_credentials
from infermesh.core.proto import control_pb2, control_pb2_grpc
from infermesh.dev.harness import ManagedProcess, free_port, infermesh_command, wait_grpc_serving

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

VOTERS = ("n1", "n2", "n3")
READER = "n4"
START_DEADLINE_S = 40.0
CALL_TIMEOUT_S = 4.0
PIN = json.dumps({"nodes": ["gpu-1", "gpu-2"], "min_replicas": 1})

T = TypeVar("T")


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


class ControlPlane:
    """Configs, certificates and processes of the four agents, and Control API clients."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "certs"
        init_ca_dir(self.pki, days=2)
        for name in (*VOTERS, READER):
            issue_to_dir(self.pki, Identity(name, "node"), hosts=["127.0.0.1"])
        issue_to_dir(self.pki, Identity("root", "admin"))
        issue_to_dir(self.pki, Identity("ops", "operator"))
        (root / "raft.secret").write_text("a shared raft secret\n")
        self.raft = {name: f"127.0.0.1:{free_port()}" for name in VOTERS}
        self.control = {name: f"127.0.0.1:{free_port()}" for name in (*VOTERS, READER)}
        self.processes: dict[str, ManagedProcess] = {}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    # ------------------------------------------------------------------ processes

    def config(self, name: str) -> Path:
        directory = self.root / name
        directory.mkdir(exist_ok=True)
        lines = [
            "[node]",
            f"id = {_toml(name)}",
            "[agent]",
            f"socket = {_toml(str(directory / 'agent.sock'))}",
            'metrics_listen = ""',
            f"data_dir = {_toml(str(directory / 'data'))}",
            "shutdown_grace_s = 2.0",
            "[control]",
            f"listen = {_toml(self.control[name])}",
            f"cert = {_toml(str(self.pki / f'{name}.pem'))}",
            f"key = {_toml(str(self.pki / f'{name}-key.pem'))}",
            f"ca = {_toml(str(self.pki / 'ca.pem'))}",
        ]
        if name in self.raft:
            lines += [
                "[raft]",
                f"listen = {_toml(self.raft[name])}",
                f"voters = [{', '.join(_toml(v) for v in self.raft.values())}]",
                f"password_file = {_toml(str(self.root / 'raft.secret'))}",
                "election_timeout_s = [0.4, 1.2]",
                "heartbeat_s = 0.05",
                "commit_timeout_s = 2.0",
            ]
        else:
            voters = ", ".join(_toml(self.control[v]) for v in VOTERS)
            lines += ["[policy]", f"voters = [{voters}]", "watch_retry_s = 0.5"]
        path = directory / "infermesh.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def start(self, *names: str) -> None:
        """Start the agents at once and wait until each serves its Scoring API."""
        deadline = time.monotonic() + START_DEADLINE_S
        started = []
        for name in names:
            argv = [*infermesh_command(), "agent", "run", "--config", str(self.config(name))]
            process = ManagedProcess(
                name, [*argv, "--log-format", "json"], self.root / f"{name}.log"
            )
            await process.start(dict(os.environ))
            self.processes[name] = process
            started.append(process)
        await asyncio.gather(
            *(
                wait_grpc_serving(f"unix://{self.root / p.name / 'agent.sock'}", p, deadline)
                for p in started
            )
        )

    async def kill(self, name: str) -> None:
        """SIGKILL: no goodbye, no snapshot."""
        process = self.processes.pop(name)
        assert process.process is not None
        process.process.kill()
        await process.process.wait()

    async def stop(self, *names: str) -> None:
        await asyncio.gather(*(self.processes.pop(n).stop(grace_s=5.0) for n in names))

    async def aclose(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        await asyncio.gather(*(p.stop(grace_s=5.0) for p in self.processes.values()))

    # ------------------------------------------------------------------ Control API

    def client(self, name: str, who: str = "root") -> control_pb2_grpc.ControlStub:
        """A Control API client of agent `name` with the certificate of `who`."""
        channel = self._channels.get((name, who))
        if channel is None:
            credentials = channel_credentials(
                self.pki / "ca.pem", self.pki / f"{who}.pem", self.pki / f"{who}-key.pem"
            )
            channel = grpc.aio.secure_channel(self.control[name], credentials)
            self._channels[(name, who)] = channel
        return control_pb2_grpc.ControlStub(channel)

    async def store(self, name: str) -> control_pb2.PolicyStoreInfo:
        reply = await self.client(name).ListNodes(
            control_pb2.ListNodesRequest(), timeout=CALL_TIMEOUT_S
        )
        info: control_pb2.PolicyStoreInfo = reply.policy_store
        return info

    async def policy(self, name: str) -> dict[str, Any]:
        reply = await self.client(name).GetPolicy(
            control_pb2.GetPolicyRequest(), timeout=CALL_TIMEOUT_S
        )
        document: dict[str, Any] = json.loads(reply.json)
        return document

    async def leader(self, deadline_s: float) -> str:
        """The voter whose policy store reports role leader."""

        async def find() -> str | None:
            for name in VOTERS:
                if name in self.processes and (await self.store(name)).role == "leader":
                    return name
            return None

        return await eventually(find, "a Raft leader among the voters", deadline_s)

    async def everywhere(
        self, names: tuple[str, ...], kind: str, entry: str, deadline_s: float
    ) -> None:
        """Wait until every agent in `names` serves a policy with `kind[entry]`."""

        async def present() -> bool | None:
            documents = [await self.policy(name) for name in names]
            return all(entry in d.get(kind, {}) for d in documents) or None

        await eventually(present, f"{kind}[{entry!r}] on {', '.join(names)}", deadline_s)

    async def drain_event(self, name: str, node: str, deadline_s: float) -> None:
        """Wait until agent `name` lists a `drained` event for `node` in SubscribeEvents."""

        async def listed() -> bool | None:
            request = control_pb2.SubscribeEventsRequest(kinds=["drain"])
            events = self.client(name).SubscribeEvents(request, timeout=CALL_TIMEOUT_S)
            seen = [(e.action, e.subject) async for e in events]
            return ("drained", node) in seen or None

        await eventually(listed, f"a drain event for {node} on {name}", deadline_s)


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, deadline_s: float) -> T:
    """Poll `probe` until it returns a value; UNAVAILABLE answers count as not yet."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            found = await probe()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            found = None
        if found is not None:
            return found
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def committed(write: Callable[[], Awaitable[T]], what: str, deadline_s: float) -> T:
    """Retry a write the cluster answers UNAVAILABLE (no leader yet) until it commits."""

    async def attempt() -> T | None:
        return await write()

    return await eventually(attempt, f"{what} to commit", deadline_s)


@asynccontextmanager
async def control_plane(root: Path) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(root)
    try:
        yield plane
    finally:
        await plane.aclose()


async def test_three_voters_and_a_reader_keep_the_policy_through_failover_and_restart(
    tmp_path: Path,
) -> None:
    async with control_plane(tmp_path) as plane:
        await plane.start(*VOTERS, READER)
        leader = await plane.leader(deadline_s=15)
        follower = next(name for name in VOTERS if name != leader)

        # A policy set through a follower is forwarded to the leader and readable everywhere.
        await committed(
            lambda: plane.client(follower).SetPolicy(
                control_pb2.SetPolicyRequest(kind="pins", name="llama", value_json=PIN),
                timeout=CALL_TIMEOUT_S,
            ),
            "a pin set through a follower",
            deadline_s=10,
        )
        await plane.everywhere(VOTERS, "pins", "llama", deadline_s=10)

        # The reader is not a voter: it reads through one and says so.
        reader = await plane.store(READER)
        assert (reader.backend, reader.role) == ("remote", "reader")
        assert reader.leader in plane.control.values()

        # SIGKILL the leader: a write through a survivor commits again within 5 s.
        await plane.kill(leader)
        killed_at = time.monotonic()
        survivors = tuple(name for name in VOTERS if name != leader)
        await committed(
            lambda: plane.client(survivors[0]).DrainNode(
                control_pb2.DrainNodeRequest(node="gpu-1", reason="failover"),
                timeout=CALL_TIMEOUT_S,
            ),
            "a drain through a survivor",
            deadline_s=5,
        )
        failover_s = time.monotonic() - killed_at
        print(f"write committed through a survivor {failover_s:.2f} s after SIGKILL of the leader")
        assert failover_s < 5.0
        await plane.everywhere((*survivors, READER), "drains", "gpu-1", deadline_s=10)
        await plane.drain_event(READER, "gpu-1", deadline_s=5)

        # A drain an operator sends to the reader is made on a voter, on the operator's behalf.
        drained = await committed(
            lambda: plane.client(READER, who="ops").DrainNode(
                control_pb2.DrainNodeRequest(node="gpu-2", reason="via the reader"),
                timeout=CALL_TIMEOUT_S * 2,
            ),
            "a drain sent to the reader",
            deadline_s=10,
        )
        assert "gpu-2" in json.loads(drained.json)["drains"]
        await plane.everywhere(survivors, "drains", "gpu-2", deadline_s=10)

        # Every voter stopped and restarted: every committed policy is still there.
        await plane.stop(*survivors)
        await plane.start(*VOTERS)
        await plane.leader(deadline_s=15)
        for entry in ("gpu-1", "gpu-2"):
            await plane.everywhere(VOTERS, "drains", entry, deadline_s=15)
        await plane.everywhere(VOTERS, "pins", "llama", deadline_s=15)
        document = await plane.policy(READER)
        assert sorted(document["drains"]) == ["gpu-1", "gpu-2"]

"""The Raft policy store: three voters on loopback elect a leader, forward writes from
followers, survive the loss of the leader and a restart of every voter at once."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from infermesh.agent.policy.raft import JOURNAL_NAME, SNAPSHOT_NAME, RaftPolicyStore
from infermesh.core.policy import (
    DrainNode,
    NotLeaderError,
    Pin,
    PolicyCommand,
    PolicyError,
    PolicyKind,
    PolicySet,
    PolicyStoreContext,
    SetPolicy,
    UndrainNode,
)

pytestmark = pytest.mark.anyio

PASSWORD = "correct horse battery staple"
DEADLINE_S = 15.0


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def voter(data_dir: Path, listen: str, voters: list[str], **extra: Any) -> RaftPolicyStore:
    options = {
        "listen": listen,
        "voters": voters,
        "password": PASSWORD,
        "election_timeout_s": [0.4, 1.2],
        "heartbeat_s": 0.05,
        "commit_timeout_s": 3.0,
        **extra,
    }
    context = PolicyStoreContext(node=listen, data_dir=str(data_dir), options=options)
    return RaftPolicyStore(context)


class Cluster:
    def __init__(self, root: Path, size: int = 3, **extra: Any) -> None:
        self.root = root
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.stores: dict[str, RaftPolicyStore] = {}
        self.extra = extra

    async def start(self, address: str | None = None) -> None:
        for each in [address] if address else self.addresses:
            store = voter(self.root / each.replace(":", "_"), each, self.addresses, **self.extra)
            await store.start()
            self.stores[each] = store

    async def stop(self, address: str) -> None:
        await self.stores.pop(address).aclose()

    async def leader(self) -> str:
        async def known() -> str | None:
            for address, store in self.stores.items():
                if (await store.status()).role == "leader":
                    return address
            return None

        address: str = await eventually(known)
        return address

    async def aclose(self) -> None:
        for address in list(self.stores):
            await self.stop(address)


async def eventually(probe: Callable[[], Awaitable[Any]], deadline_s: float = DEADLINE_S) -> Any:
    """Poll `probe` until it returns something truthy; fail after `deadline_s`."""
    end = time.monotonic() + deadline_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"condition not met within {deadline_s} s")
        await anyio.sleep(0.05)


async def submit_eventually(store: RaftPolicyStore, command: PolicyCommand) -> PolicySet:
    """Submit, retrying while the cluster has no leader yet (what a client does)."""

    async def attempt() -> PolicySet | None:
        try:
            return await store.submit(command)
        except NotLeaderError:
            return None

    result: PolicySet = await eventually(attempt)
    return result


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    running = Cluster(tmp_path)
    await running.start()
    yield running
    await running.aclose()


PIN = SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1", "gpu-2"), 2))


async def test_a_write_on_a_follower_is_applied_on_every_voter(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(a for a in cluster.addresses if a != leader)
    written = await submit_eventually(cluster.stores[follower], PIN)
    assert written.pins["llama"] == Pin(("gpu-1", "gpu-2"), 2)

    async def everywhere() -> bool:
        policies = [await store.get() for store in cluster.stores.values()]
        return all(p.pins.get("llama") == PIN.value for p in policies)

    await eventually(everywhere)
    status = await cluster.stores[follower].status()
    assert status.role == "follower"
    assert status.leader == leader
    assert status.voters == tuple(cluster.addresses)


async def test_an_invalid_command_is_rejected_with_the_field_and_not_replicated(
    cluster: Cluster,
) -> None:
    await cluster.leader()
    store = next(iter(cluster.stores.values()))
    with pytest.raises(PolicyError, match=r"pins\['llama'\]\.min_replicas: must be >= 0, got -1"):
        await store.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("a",), -1)))
    # judged when applied (by every voter alike), since a follower's copy may trail
    with pytest.raises(PolicyError, match=r"drains\['gpu-9'\]: node is not drained"):
        await store.submit(UndrainNode("gpu-9"))
    assert (await store.get()).revision == 0


async def test_a_watcher_on_a_follower_sees_a_change_made_elsewhere(cluster: Cluster) -> None:
    leader = await cluster.leader()
    follower = next(a for a in cluster.addresses if a != leader)
    watch = cluster.stores[follower].watch()
    assert (await anext(watch)).revision == 0
    await submit_eventually(cluster.stores[leader], DrainNode("gpu-3", "disk swap", 1.0))
    with anyio.fail_after(DEADLINE_S):
        changed = await anext(watch)
    assert changed.drains["gpu-3"].reason == "disk swap"


async def test_losing_the_leader_elects_another_and_writes_succeed_again(cluster: Cluster) -> None:
    await submit_eventually(cluster.stores[cluster.addresses[0]], PIN)
    old_leader = await cluster.leader()
    await cluster.stop(old_leader)
    new_leader = await cluster.leader()
    assert new_leader != old_leader
    survivor = cluster.stores[new_leader]
    written = await submit_eventually(survivor, DrainNode("gpu-1", "after failover", 2.0))
    assert written.pins["llama"] == PIN.value
    assert written.drains["gpu-1"].reason == "after failover"


async def test_every_voter_restarted_at_once_keeps_the_committed_policy(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path)
    await cluster.start()
    try:
        await submit_eventually(cluster.stores[cluster.addresses[1]], PIN)
        last = await submit_eventually(cluster.stores[cluster.addresses[2]], DrainNode("gpu-2"))

        async def everywhere() -> bool:
            revisions = [(await s.get()).revision for s in cluster.stores.values()]
            return revisions == [last.revision] * 3

        await eventually(everywhere)
        await cluster.aclose()
        assert all(
            (tmp_path / a.replace(":", "_") / JOURNAL_NAME).exists() for a in cluster.addresses
        )

        await cluster.start()

        async def restored() -> bool:
            policies = [await s.get() for s in cluster.stores.values()]
            return all(p.pins.get("llama") == PIN.value and "gpu-2" in p.drains for p in policies)

        await eventually(restored)
        await cluster.leader()
    finally:
        await cluster.aclose()


async def test_a_restart_from_a_snapshot_and_a_truncated_journal_keeps_the_policy(
    tmp_path: Path,
) -> None:
    cluster = Cluster(tmp_path, snapshot_after_entries=2)
    await cluster.start()
    try:
        store = cluster.stores[cluster.addresses[0]]
        for index in range(6):
            last = await submit_eventually(store, DrainNode(f"gpu-{index}"))
        snapshots = [tmp_path / a.replace(":", "_") / SNAPSHOT_NAME for a in cluster.addresses]

        async def snapshotted() -> bool:
            return all(snapshot.exists() for snapshot in snapshots)

        await eventually(snapshotted)
        await cluster.aclose()
        await cluster.start()

        async def restored() -> bool:
            policies = [await s.get() for s in cluster.stores.values()]
            return all(p == last for p in policies)

        await eventually(restored)
    finally:
        await cluster.aclose()


def test_more_than_one_voter_without_a_password_is_refused(tmp_path: Path) -> None:
    voters = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    with pytest.raises(PolicyError, match=r"raft\.password: required with 3 voters"):
        voter(tmp_path, voters[0], voters, password=None)


async def test_a_single_voter_needs_no_password_and_commits_alone(tmp_path: Path) -> None:
    [address] = [f"127.0.0.1:{port}" for port in free_ports(1)]
    store = voter(tmp_path, address, [address], password=None)
    await store.start()
    try:
        written = await submit_eventually(store, PIN)
        assert written.revision == 1
        assert (await store.status()).role == "leader"
    finally:
        await store.aclose()

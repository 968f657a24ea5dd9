"""GossipService on real UDP and TCP sockets on 127.0.0.1: join, leave, state, keys, bad input."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest
import structlog
from anyio.abc import TaskGroup, TaskStatus

from infermesh.agent.gossip.codec import Packet, encode_packet
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.keyring import Keyring, generate_key
from infermesh.agent.gossip.members import MemberEvent
from infermesh.agent.gossip.messages import Gossip
from infermesh.agent.gossip.service import GossipService, GossipSettings
from infermesh.agent.gossip.values import NodeMeta
from infermesh.core.config import parse_host_port
from infermesh.core.model import ModelStateDelta, TargetKey
from infermesh.core.scoring.state import StateStore

pytestmark = pytest.mark.anyio

# Fast gossip, but probes as patient as memberlist's LAN profile: three services share one
# event loop (in asyncio debug mode, on a possibly loaded machine), and a probe timeout of a
# few ms would make them suspect each other whenever the loop is slow.
FAST = SwimConfig(
    probe_interval_s=1.0,
    probe_timeout_s=0.5,
    gossip_interval_s=0.05,
    push_pull_interval_s=2.0,
)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `timeout_s`."""
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.02)


def settings(
    name: str, key_file: Path, seeds: tuple[str, ...] = (), key_reload_s: float = 1.0
) -> GossipSettings:
    return GossipSettings(
        node_id=name,
        bind="127.0.0.1:0",
        advertise="",
        seeds=seeds,
        key_file=key_file,
        insecure=False,
        swim=FAST,
        meta=NodeMeta(node=name, roles=("agent",)),
        key_reload_s=key_reload_s,
    )


class Cluster:
    """Gossip services in one task group, each in its own cancel scope."""

    def __init__(self, tg: TaskGroup, key_file: Path, key_reload_s: float = 1.0) -> None:
        self.tg = tg
        self.key_file = key_file
        self.key_reload_s = key_reload_s
        self.services: dict[str, GossipService] = {}
        self.scopes: dict[str, anyio.CancelScope] = {}

    async def start(self, name: str, seeds: tuple[str, ...] = ()) -> GossipService:
        service = GossipService(
            settings(name, self.key_file, seeds, self.key_reload_s), StateStore()
        )
        scope = anyio.CancelScope()

        async def run(*, task_status: TaskStatus[GossipService]) -> None:
            with scope:
                await service.run(task_status=task_status)

        await self.tg.start(run)
        self.services[name], self.scopes[name] = service, scope
        return service

    def view(self, name: str) -> dict[str, str]:
        return {m.node: m.state for m in self.services[name].members()}

    def all_see(self, names: tuple[str, ...], states: dict[str, str]) -> bool:
        return all({k: v for k, v in self.view(n).items() if k in states} == states for n in names)


@asynccontextmanager
async def cluster(
    tmp_path: Path, names: tuple[str, ...] = ("a", "b", "c"), key_reload_s: float = 1.0
) -> AsyncIterator[Cluster]:
    """`names` started, the first as the seed, all seeing each other alive."""
    key_file = tmp_path / "gossip.key"
    key_file.write_text(generate_key() + "\n")
    async with anyio.create_task_group() as tg:
        mesh = Cluster(tg, key_file, key_reload_s)
        seed = await mesh.start(names[0])
        by_name = "localhost:" + seed.address.rpartition(":")[2]  # seeds may be DNS names
        for index, name in enumerate(names[1:]):
            await mesh.start(name, seeds=(by_name if index else seed.address,))
        await wait_for(lambda: mesh.all_see(names, dict.fromkeys(names, "alive")))
        yield mesh
        tg.cancel_scope.cancel()


async def test_services_join_through_one_seed_and_a_cancelled_one_leaves(
    tmp_path: Path,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with cluster(tmp_path) as mesh:
            assert {m.meta.roles for m in mesh.services["a"].members() if m.meta} == {("agent",)}

            mesh.scopes["c"].cancel()
            await wait_for(lambda: mesh.all_see(("a", "b"), {"c": "left"}))

            await wait_for(lambda: mesh.all_see(("a", "b"), {"a": "alive", "b": "alive"}))
            await wait_for(lambda: mesh.services["a"].counters.probes > 0)
            assert not mesh.services["a"].counters.dropped

    member_logs = [(e["kind"], e["member"]) for e in logs if e["event"] == "gossip member"]
    assert ("joined", "b") in member_logs
    assert ("left", "c") in member_logs


async def test_a_local_state_change_reaches_the_other_nodes_stores(tmp_path: Path) -> None:
    async with cluster(tmp_path, names=("a", "b")) as mesh:
        a, b = mesh.services["a"], mesh.services["b"]
        key = TargetKey(model="llama", node="a", endpoint="http://127.0.0.1:8000")
        not_ours = TargetKey(model="llama", node="z", endpoint="http://127.0.0.1:9000")

        a.store.apply_model_delta(ModelStateDelta(key, 1, {"running": 4.0}))
        a.store.apply_model_delta(ModelStateDelta(not_ours, 1, {"running": 9.0}))
        await wait_for(lambda: (s := b.store.get_model(key)) is not None and s.running == 4.0)

        assert b.store.get_model(not_ours) is None  # only a node's own states are gossiped


async def test_keys_rotate_through_the_key_file_without_losing_members(tmp_path: Path) -> None:
    async with cluster(tmp_path, key_reload_s=0.05) as mesh:
        services = mesh.services.values()
        losses: list[MemberEvent] = []
        for service in services:
            service.subscribe(lambda e: losses.append(e) if e.kind in ("dead", "left") else None)
        old = base64.b64decode(mesh.key_file.read_text())
        new = generate_key()

        async def rewrite(lines: list[str], done: Callable[[Keyring], bool]) -> None:
            mesh.key_file.write_text("\n".join(lines) + "\n")
            await wait_for(lambda: all(s.keyring is not None and done(s.keyring) for s in services))

        new_key = base64.b64decode(new)
        old_line = base64.b64encode(old).decode()
        await rewrite([old_line, new], lambda k: new_key in k.keys)  # install
        await rewrite([new, old_line], lambda k: k.primary == new_key)  # use
        await rewrite([new], lambda k: k.keys == (new_key,))  # remove the old one
        received = {s.settings.node_id: s.counters.packets_in for s in services}
        await wait_for(
            lambda: all(s.counters.packets_in >= received[s.settings.node_id] + 2 for s in services)
        )

        # Not one packet failed to open, so no member was ever lost (a load spike may still
        # make a probe late: a passing suspicion is no loss).
        assert [s.counters.dropped for s in services] == [{}, {}, {}]
        assert losses == []

        # A bad key file keeps the keys in use.
        with structlog.testing.capture_logs() as logs:
            mesh.key_file.write_text("not base64 at all\n")
            await wait_for(lambda: sum(e["log_level"] == "error" for e in logs) >= len(services))
        assert all(s.keyring is not None and s.keyring.keys == (new_key,) for s in services)
        names = ("a", "b", "c")
        await wait_for(lambda: mesh.all_see(names, dict.fromkeys(names, "alive")))
        assert losses == []


async def test_a_datagram_sealed_under_an_unknown_key_is_dropped_and_counted(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, names=("a",)) as mesh:
        a = mesh.services["a"]
        plaintext, _ = encode_packet(Packet("mallory", "127.0.0.1:9", (Gossip(()),)))
        foreign = Keyring([bytes(32)]).seal(plaintext)
        host, port = parse_host_port(a.address)

        async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
            await udp.sendto(foreign, host, port)
            await wait_for(lambda: a.counters.dropped.get("unknown_key", 0) == 1)

        assert [m.node for m in a.members()] == ["a"]


async def test_bad_tcp_messages_are_dropped_and_the_service_keeps_serving(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, names=("a", "b")) as mesh:
        a = mesh.services["a"]
        host, port = parse_host_port(a.address)

        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send((2**31).to_bytes(4, "big"))  # far over MAX_STREAM_BYTES
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send((100).to_bytes(4, "big") + b"short")
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send((10).to_bytes(4, "big") + b"0123456789")
        await wait_for(
            lambda: {"too_large", "truncated", "bad_seal"} <= set(a.counters.dropped),
        )

        # A newcomer still joins through a's TCP port.
        await mesh.start("c", seeds=(a.address,))
        await wait_for(lambda: mesh.all_see(("a", "b", "c"), dict.fromkeys("abc", "alive")))

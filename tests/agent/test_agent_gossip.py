"""The agent with `[gossip]` on: agents in one process join, share state, serve their members;
start-up errors an operator can act on; the `infermesh agent gossip` commands."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import grpc
import pytest
from click.testing import CliRunner

from infermesh.agent.api.server import unix_target
from infermesh.agent.cli import agent_group, format_members
from infermesh.agent.daemon import Agent, AgentStartupError, node_meta
from infermesh.core import builtin as core_plugin
from infermesh.core.config import (
    AgentConfig,
    Config,
    GossipConfig,
    NodeConfig,
    RouterConfig,
    RuntimeConfig,
)
from infermesh.core.convert import model_delta_to_pb
from infermesh.core.model import ModelStateDelta, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh.core.proto import state_pb2_grpc

pytestmark = pytest.mark.anyio

FAST = {
    "probe_interval_s": 0.2,
    "probe_timeout_s": 0.1,
    "gossip_interval_s": 0.05,
    "push_pull_interval_s": 2.0,
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def key_file(workdir: Path) -> Path:
    result = CliRunner().invoke(agent_group, ["gossip", "keygen"])
    assert result.exit_code == 0, result.output
    path = workdir / "gossip.key"
    path.write_text(result.output)
    return path


def gossip_config(
    workdir: Path, node_id: str, key_file: Path | None, seeds: list[str], **gossip: Any
) -> Config:
    options: dict[str, Any] = {
        "enabled": True,
        "bind": "127.0.0.1:0",
        "seeds": seeds,
        "key_file": str(key_file) if key_file else "",
        "insecure": key_file is None,
        **FAST,
    }
    options.update(gossip)
    return Config(
        node=NodeConfig(id=node_id, zone="z1", labels={"rack": "r7"}),
        agent=AgentConfig(
            socket=str(workdir / node_id / "agent.sock"),
            metrics_listen="127.0.0.1:0",
            shutdown_grace_s=2.0,
        ),
        gossip=GossipConfig(**options),
    )


def make_agent(config: Config) -> Agent:
    return Agent(config, PluginHost.load(entry_point_list=[], extra=[("core", core_plugin)]))


@asynccontextmanager
async def running(*agents: Agent) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for agent in agents:
            await tg.start(partial(agent.run, handle_signals=False))
        try:
            yield
        finally:
            for agent in agents:
                agent.request_stop()


def http_url(agent: Agent) -> str:
    assert agent.metrics_server is not None
    return f"http://127.0.0.1:{agent.metrics_server.port}"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0
) -> None:
    deadline = anyio.current_time() + timeout_s
    while not await condition():
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await anyio.sleep(0.05)


async def test_two_agents_join_share_state_and_list_each_other(
    workdir: Path, key_file: Path
) -> None:
    first = make_agent(gossip_config(workdir, "n1", key_file, [], roles=["gpu"]))
    async with running(first):
        assert first.gossip is not None
        second = make_agent(gossip_config(workdir, "n2", key_file, [first.gossip.address]))
        async with running(second):

            async def both_alive() -> bool:
                status, text = await get(f"{http_url(second)}/gossip/members")
                states = {m["node"]: m["state"] for m in json.loads(text)["members"]}
                return status == 200 and states == {"n1": "alive", "n2": "alive"}

            await wait_until(both_alive, "n2 to see n1 and itself alive")
            _, text = await get(f"{http_url(second)}/gossip/members")
            body = json.loads(text)
            assert body["node"] == "n2"
            assert second.gossip is not None
            assert body["address"] == second.gossip.address
            n1 = next(m for m in body["members"] if m["node"] == "n1")
            assert n1["address"] == first.gossip.address
            assert (n1["roles"], n1["zone"], n1["labels"]) == (["gpu"], "z1", {"rack": "r7"})
            assert n1["apis"]["router"] == "127.0.0.1:8080"

            # A replica's state pushed into n1's agent reaches n2's store through gossip.
            key = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8001")
            delta = ModelStateDelta(key, 1, {"last_updated": time.time(), "running": 3})
            async with grpc.aio.insecure_channel(unix_target(first.config.agent.socket)) as ch:
                await state_pb2_grpc.StateStub(ch).PushModelDeltas(iter([model_delta_to_pb(delta)]))

            async def replicated() -> bool:
                state = second.store.get_model(key)
                return state is not None and state.running == 3

            await wait_until(replicated, "n1's target to reach n2's store")

            async def metrics_count_both_alive() -> bool:
                _, page = await get(f"{http_url(second)}/metrics")
                return 'infermesh_gossip_members{state="alive"} 2.0' in page

            await wait_until(metrics_count_both_alive, "n2's metrics to count two alive")
            _, page = await get(f"{http_url(second)}/metrics")
            assert 'infermesh_gossip_packets_dropped_total{reason="unknown_key"} 0.0' in page
            for name in ("probes", "suspicions", "refutations"):
                assert f"infermesh_gossip_{name}_total " in page
            assert 'infermesh_gossip_bytes_total{direction="in"}' in page

            runner = CliRunner()
            result = await anyio.to_thread.run_sync(
                partial(runner.invoke, agent_group, ["gossip", "members", "--url", http_url(first)])
            )
            assert result.exit_code == 0, result.output
            lines = result.output.splitlines()
            assert lines[0].split() == [
                "NODE",
                "STATE",
                "ADDRESS",
                "INCARNATION",
                "RTT_MS",
                "ZONE",
                "ROLES",
            ]
            assert lines[1].split()[:2] == ["n1*", "alive"]
            assert lines[2].split()[:2] == ["n2", "alive"]


async def test_members_endpoint_answers_404_when_gossip_is_off(workdir: Path) -> None:
    config = gossip_config(workdir, "n1", None, [], enabled=False)
    agent = make_agent(config)
    async with running(agent):
        status, text = await get(f"{http_url(agent)}/gossip/members")
        _, page = await get(f"{http_url(agent)}/metrics")
    assert status == 404
    assert "gossip.enabled = true" in json.loads(text)["error"]
    assert "infermesh_gossip_" not in page


def test_a_missing_key_file_stops_start_up_naming_the_file(workdir: Path) -> None:
    config = gossip_config(workdir, "n1", workdir / "nope.key", [])
    with pytest.raises(AgentStartupError, match=r"gossip\.key_file: .*nope\.key"):
        make_agent(config)


def test_an_override_that_conflicts_with_the_profile_stops_start_up(workdir: Path) -> None:
    config = gossip_config(workdir, "n1", None, [], probe_interval_s=0, probe_timeout_s=2.0)
    with pytest.raises(AgentStartupError, match=r"gossip\.probe_timeout_s .*profile 'lan'"):
        make_agent(config)


async def test_a_gossip_port_in_use_stops_start_up(workdir: Path) -> None:
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        agent = make_agent(gossip_config(workdir, "n1", None, [], bind=f"127.0.0.1:{port}"))
        with pytest.raises(AgentStartupError, match=rf"gossip\.bind 127\.0\.0\.1:{port}"):
            await agent.run(handle_signals=False)
    assert not await anyio.Path(agent.config.agent.socket).exists()


def test_node_meta_advertises_reachable_apis_and_runtimes() -> None:
    config = Config(
        node=NodeConfig(id="n1", zone="rack-zone", labels={"b": "2", "a": "1"}),
        agent=AgentConfig(listen="0.0.0.0:7000", metrics_listen="127.0.0.1:0"),
        router=RouterConfig(listen="[::]:8080"),
        runtimes=[RuntimeConfig(kind="vllm", url="http://10.0.0.5:8000")],
        gossip=GossipConfig(roles=["gpu", "router"]),
    )
    meta = node_meta(config, gossip_host="10.0.0.5")
    assert meta.node == "n1"
    assert meta.roles == ("gpu", "router")
    assert meta.zone == "rack-zone"
    assert meta.labels == (("a", "1"), ("b", "2"))
    assert dict(meta.apis) == {"scoring": "10.0.0.5:7000", "router": "10.0.0.5:8080"}
    assert meta.runtimes == ("http://10.0.0.5:8000",)


def test_keygen_prints_a_fresh_256_bit_key() -> None:
    first = CliRunner().invoke(agent_group, ["gossip", "keygen"])
    second = CliRunner().invoke(agent_group, ["gossip", "keygen"])
    assert first.exit_code == 0
    assert len(base64.b64decode(first.output.strip(), validate=True)) == 32
    assert first.output != second.output


def test_members_command_explains_an_agent_it_cannot_reach() -> None:
    result = CliRunner().invoke(
        agent_group, ["gossip", "members", "--url", "http://127.0.0.1:9", "--timeout", "1"]
    )
    assert result.exit_code == 1
    assert "cannot reach the agent at http://127.0.0.1:9/gossip/members" in result.output


def test_members_table_marks_this_node_and_shows_rtt_in_ms() -> None:
    body = {
        "node": "b",
        "members": [
            {"node": "a", "state": "dead", "address": "10.0.0.1:7946", "incarnation": 3},
            {"node": "b", "state": "alive", "rtt_s": 0.00125, "roles": ["gpu"], "zone": "z"},
        ],
    }
    lines = format_members(body).splitlines()
    assert lines[1].split() == ["a", "dead", "10.0.0.1:7946", "3", "-", "-", "-"]
    assert lines[2].split() == ["b*", "alive", "1.25", "z", "gpu"]


def test_members_command_finds_the_agent_from_the_config(workdir: Path) -> None:
    config = workdir / "agent.toml"
    config.write_text('[agent]\nmetrics_listen = "0.0.0.0:9"\n')
    result = CliRunner().invoke(
        agent_group, ["gossip", "members", "--config", str(config), "--timeout", "1"]
    )
    assert result.exit_code == 1
    assert "cannot reach the agent at http://127.0.0.1:9/gossip/members" in result.output

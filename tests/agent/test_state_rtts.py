"""The State service's ListNodeRtts: the gossip mesh's RTT estimates, over a real Unix socket,
for routers that rank locally."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import grpc
import pytest

from infermesh.agent.api.server import unix_target
from infermesh.agent.api.state import StateService
from infermesh.agent.daemon import Agent
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, GossipConfig, NodeConfig
from infermesh.core.plugins import PluginHost
from infermesh.core.proto import state_pb2, state_pb2_grpc
from infermesh.core.scoring.state import StateStore

pytestmark = pytest.mark.anyio

FAST_GOSSIP = {
    "probe_interval_s": 0.1,
    "probe_timeout_s": 0.05,
    "gossip_interval_s": 0.05,
    "push_pull_interval_s": 2.0,
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def state_stub(
    socket_path: Path, service: StateService
) -> AsyncIterator[state_pb2_grpc.StateStub]:
    """`service` alone on a gRPC server at `socket_path`; yields a client stub."""
    server = grpc.aio.server()
    state_pb2_grpc.add_StateServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            yield state_pb2_grpc.StateStub(channel)
    finally:
        await server.stop(None)


async def list_rtts(stub: state_pb2_grpc.StateStub, node: str = "") -> dict[str, float]:
    reply = await stub.ListNodeRtts(state_pb2.ListRequest(node=node), timeout=5.0)
    return {entry.node: entry.rtt_s for entry in reply.rtts}


def agent_config(workdir: Path, node_id: str, gossip: Mapping[str, object] | None) -> Config:
    options = (
        {"bind": "127.0.0.1:0", "insecure": True, **FAST_GOSSIP, **gossip, "enabled": True}
        if gossip is not None
        else {"enabled": False}
    )
    return Config(
        node=NodeConfig(id=node_id),
        agent=AgentConfig(
            socket=str(workdir / node_id / "agent.sock"), metrics_listen="", shutdown_grace_s=2.0
        ),
        gossip=GossipConfig(**options),
    )


def make_agent(config: Config) -> Agent:
    return Agent(config, PluginHost.load(entry_point_list=[], extra=[("core", core_plugin)]))


@asynccontextmanager
async def running(*agents: Agent) -> AsyncIterator[list[state_pb2_grpc.StateStub]]:
    """Run `agents`; yields a State stub on each one's socket."""
    async with anyio.create_task_group() as tg:
        channels = []
        for agent in agents:
            await tg.start(partial(agent.run, handle_signals=False))
            channels.append(grpc.aio.insecure_channel(unix_target(agent.config.agent.socket)))
        try:
            yield [state_pb2_grpc.StateStub(channel) for channel in channels]
        finally:
            for channel in channels:
                await channel.close()
            for agent in agents:
                agent.request_stop()


async def test_list_node_rtts_lists_the_sources_estimates_and_filters_by_node(
    workdir: Path,
) -> None:
    estimates = {"n2": 0.012, "n1": 0.0, "n3": 0.250}
    service = StateService(StateStore(), rtt_source=lambda: estimates)
    async with state_stub(workdir / "state.sock", service) as stub:
        reply = await stub.ListNodeRtts(state_pb2.ListRequest(), timeout=5.0)
        assert [(e.node, e.rtt_s) for e in reply.rtts] == [
            ("n1", 0.0),
            ("n2", 0.012),
            ("n3", 0.250),
        ], "every estimate, sorted by node"
        assert await list_rtts(stub, node="n3") == {"n3": 0.250}
        assert await list_rtts(stub, node="n9") == {}
        estimates["n4"] = 0.003
        assert "n4" in await list_rtts(stub), "each call asks the source afresh"


async def test_list_node_rtts_leaves_out_estimates_that_are_not_times(workdir: Path) -> None:
    estimates = {"ok": 0.01, "nan": float("nan"), "inf": float("inf"), "neg": -0.5, "": 0.01}
    service = StateService(StateStore(), rtt_source=lambda: estimates)
    async with state_stub(workdir / "state.sock", service) as stub:
        assert await list_rtts(stub) == {"ok": 0.01}


async def test_an_agent_without_gossip_lists_no_rtts(workdir: Path) -> None:
    agent = make_agent(agent_config(workdir, "n1", gossip=None))
    async with running(agent) as (stub,):
        assert await list_rtts(stub) == {}


async def test_an_agent_with_gossip_lists_its_estimated_rtt_to_a_peer(workdir: Path) -> None:
    first = make_agent(agent_config(workdir, "n1", gossip={}))
    async with running(first) as (first_stub,):
        assert first.gossip is not None
        assert await list_rtts(first_stub) == {"n1": 0.0}, "alone, it only knows itself"
        second = make_agent(agent_config(workdir, "n2", gossip={"seeds": [first.gossip.address]}))
        async with running(second) as (second_stub,):
            deadline = anyio.current_time() + 15.0
            while "n1" not in (rtts := await list_rtts(second_stub)):
                if anyio.current_time() > deadline:
                    pytest.fail(f"n2 never estimated its RTT to n1 (it lists {rtts})")
                await anyio.sleep(0.05)
            assert 0.0 < rtts["n1"] < 1.0, "a loopback RTT: positive, well under a second"
            assert rtts["n2"] == 0.0

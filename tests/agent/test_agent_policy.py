"""The agent's policy store: started from config with the agent, kept across restarts, and a
`[raft]` table that cannot work stops start-up with a message an operator can act on; what it
holds decides the agent's next scoring decision."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import grpc
import pytest

from infermesh.agent import plugin as agent_plugin
from infermesh.agent.daemon import Agent, AgentStartupError
from infermesh.agent.policy.local import DOCUMENT_NAME
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, NodeConfig, RaftConfig
from infermesh.core.model import ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh.core.policy import DrainNode, PolicySet, UndrainNode
from infermesh.core.proto import state_pb2, state_pb2_grpc

pytestmark = pytest.mark.anyio


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_config(workdir: Path, raft: RaftConfig | None = None) -> Config:
    return Config(
        node=NodeConfig(id="n1"),
        agent=AgentConfig(
            socket=str(workdir / "agent.sock"),
            metrics_listen="",
            shutdown_grace_s=2.0,
            data_dir=str(workdir / "data"),
        ),
        raft=raft,
    )


def make_agent(config: Config) -> Agent:
    host = PluginHost.load(
        entry_point_list=[], extra=[("core", core_plugin), ("agent", agent_plugin)]
    )
    return Agent(config, host)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(agent.run, handle_signals=False))
        try:
            yield agent
        finally:
            agent.request_stop()


async def test_a_command_submitted_to_the_local_store_survives_a_restart(workdir: Path) -> None:
    config = agent_config(workdir)
    async with running(make_agent(config)) as first:
        assert (await first.policy.status()).role == "single"
        assert await first.policy.get() == PolicySet()
        applied = await first.policy.submit(DrainNode("gpu-3", "kernel upgrade", 1.0))
    assert applied.revision == 1
    assert (workdir / "data" / "policy" / DOCUMENT_NAME).is_file()

    async with running(make_agent(config)) as second:
        policy = await second.policy.get()
        assert policy.revision == 1
        assert policy.drains["gpu-3"].reason == "kernel upgrade"


async def test_a_corrupt_policy_file_stops_start_up_naming_the_file(workdir: Path) -> None:
    document = workdir / "data" / "policy" / DOCUMENT_NAME
    document.parent.mkdir(parents=True)
    document.write_text("{not json")
    agent = make_agent(agent_config(workdir))
    with pytest.raises(AgentStartupError, match=rf"policy store: {document}: not a JSON policy"):
        await agent.run(handle_signals=False)
    assert not (workdir / "agent.sock").exists()


def test_three_voters_without_a_password_refuse_to_start(workdir: Path) -> None:
    voters = ["127.0.0.1:7950", "127.0.0.1:7951", "127.0.0.1:7952"]
    raft = RaftConfig(listen=voters[0], voters=voters)
    with pytest.raises(AgentStartupError, match=r"raft\.password: required with 3 voters"):
        make_agent(agent_config(workdir, raft))


def free_tcp_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = anyio.current_time() + 15.0
    while not await condition():
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await anyio.sleep(0.05)


async def test_a_one_voter_raft_agent_commits_and_recovers_after_a_restart(workdir: Path) -> None:
    listen = f"127.0.0.1:{free_tcp_port()}"
    raft = RaftConfig(listen=listen, election_timeout_s=[0.2, 0.4], heartbeat_s=0.05)
    config = agent_config(workdir, raft)
    async with running(make_agent(config)) as first:

        async def leader() -> bool:
            return (await first.policy.status()).role == "leader"

        await wait_until(leader, "the only voter to lead")
        assert (await first.policy.status()).voters == (listen,)
        applied = await first.policy.submit(DrainNode("gpu-3", "kernel upgrade", 1.0))
        assert applied.revision == 1

    async with running(make_agent(config)) as second:

        async def recovered() -> bool:
            return (await second.policy.get()).revision == 1

        await wait_until(recovered, "the journal to be replayed")
        assert (await second.policy.get()).drains["gpu-3"].reason == "kernel upgrade"


def ranked_nodes(agent: Agent) -> list[str]:
    ranking = agent.engine.rank(RequestFeatures(model="llama"), time.time())
    return sorted(t.target_id.split("|")[0] for t in ranking.targets)


async def test_a_drain_submitted_to_the_store_steers_the_next_decision(workdir: Path) -> None:
    agent = make_agent(agent_config(workdir))
    for i, node in enumerate(["gpu-1", "gpu-2"]):
        key = TargetKey(model="llama", node=node, endpoint=f"http://10.0.0.{i}:8000")
        changes = {"last_updated": time.time() + 3600.0}  # fresh for the whole test
        agent.store.apply_model_delta(ModelStateDelta(key=key, version=1, changes=changes))
    async with running(agent):
        assert ranked_nodes(agent) == ["gpu-1", "gpu-2"]

        await agent.policy.submit(DrainNode("gpu-2", "kernel upgrade", 1.0))

        async def drained() -> bool:
            return ranked_nodes(agent) == ["gpu-1"]

        await wait_until(drained, "the drain to reach the scoring engine")
        ranking = agent.engine.rank(RequestFeatures(model="llama"), time.time())
        assert [e.why for e in ranking.excluded] == ["node gpu-2 is drained: kernel upgrade"]

        await agent.policy.submit(UndrainNode("gpu-2"))

        async def undrained() -> bool:
            return ranked_nodes(agent) == ["gpu-1", "gpu-2"]

        await wait_until(undrained, "the undrain to reach the scoring engine")


async def test_a_persisted_drain_is_in_force_when_the_agent_is_ready(workdir: Path) -> None:
    config = agent_config(workdir)
    async with running(make_agent(config)) as first:
        await first.policy.submit(DrainNode("gpu-2", "rack move", 1.0))

    second = make_agent(config)
    async with running(second):
        # No waiting: the stored policy is applied before the agent reports ready.
        assert second.engine.policy.revision == 1
        assert "gpu-2" in second.engine.policy.drains


async def test_the_state_api_serves_the_policy_a_local_mode_router_follows(workdir: Path) -> None:
    async with running(make_agent(agent_config(workdir))) as agent:
        await agent.policy.submit(DrainNode("gpu-2", "kernel upgrade", 1.0))

        async def served() -> bool:
            async with grpc.aio.insecure_channel(f"unix://{workdir / 'agent.sock'}") as channel:
                reply = await state_pb2_grpc.StateStub(channel).GetPolicy(state_pb2.ListRequest())
            policy = PolicySet.from_document(json.loads(reply.json))
            return "gpu-2" in policy.drains and reply.revision == policy.revision

        await wait_until(served, "State.GetPolicy to show the drain")

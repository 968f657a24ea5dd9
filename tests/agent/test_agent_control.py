"""The agent serves the Control API when `control.listen` is set: an operator's drain reaches
the agent's scoring policy, a caller without a client certificate is refused, and a TLS file
that cannot be read stops start-up with a message naming it."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import grpc
import grpc.aio
import pytest

from infermesh.agent import plugin as agent_plugin
from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.daemon import Agent, AgentStartupError
from infermesh.agent.tls import channel_credentials
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, ControlConfig, NodeConfig
from infermesh.core.plugins import PluginHost
from infermesh.core.proto import control_pb2, control_pb2_grpc

pytestmark = pytest.mark.anyio

DEADLINE_S = 5.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pki(workdir: Path) -> Path:
    directory = workdir / "certs"
    init_ca_dir(directory, days=2)
    issue_to_dir(directory, Identity("n1", "node"), hosts=["127.0.0.1"])
    issue_to_dir(directory, Identity("ci-bot", "operator"))
    return directory


def agent_config(workdir: Path, pki: Path, *, cert: str = "n1.pem") -> Config:
    return Config(
        node=NodeConfig(id="n1"),
        agent=AgentConfig(
            socket=str(workdir / "agent.sock"),
            metrics_listen="",
            shutdown_grace_s=2.0,
            data_dir=str(workdir / "data"),
        ),
        control=ControlConfig(
            listen="127.0.0.1:0",
            cert=str(pki / cert),
            key=str(pki / "n1-key.pem"),
            ca=str(pki / "ca.pem"),
        ),
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


def control_address(agent: Agent) -> str:
    assert agent.control is not None
    assert agent.control.port
    return f"127.0.0.1:{agent.control.port}"


async def test_an_operator_drains_a_node_through_the_agents_control_api(
    workdir: Path, pki: Path
) -> None:
    async with running(make_agent(agent_config(workdir, pki))) as agent:
        credentials = channel_credentials(
            pki / "ca.pem", pki / "ci-bot.pem", pki / "ci-bot-key.pem"
        )
        async with grpc.aio.secure_channel(control_address(agent), credentials) as channel:
            control = control_pb2_grpc.ControlStub(channel)
            drained = await control.DrainNode(
                control_pb2.DrainNodeRequest(node="gpu-3", reason="kernel upgrade"),
                timeout=DEADLINE_S,
            )
            read_back = await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
        assert drained.revision == read_back.revision == 1
        # The agent's own scoring picks the drain up from the store's watch.
        deadline = anyio.current_time() + DEADLINE_S
        while agent.engine.policy.revision < 1:
            if anyio.current_time() > deadline:
                pytest.fail("the drain never reached the agent's scoring policy")
            await anyio.sleep(0.01)
        assert agent.engine.policy.drains["gpu-3"].reason == "kernel upgrade"


async def test_a_client_without_a_certificate_is_refused(workdir: Path, pki: Path) -> None:
    async with running(make_agent(agent_config(workdir, pki))) as agent:
        credentials = channel_credentials(pki / "ca.pem")
        async with grpc.aio.secure_channel(control_address(agent), credentials) as channel:
            control = control_pb2_grpc.ControlStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails
        assert (await agent.policy.get()).revision == 0


def test_an_unreadable_control_certificate_stops_start_up_naming_the_file(
    workdir: Path, pki: Path
) -> None:
    config = agent_config(workdir, pki, cert="missing.pem")
    with pytest.raises(AgentStartupError) as info:
        make_agent(config)
    assert str(pki / "missing.pem") in str(info.value)
    assert "certificate" in str(info.value)


async def test_a_control_port_in_use_stops_start_up_naming_control_listen(
    workdir: Path, pki: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = agent_config(workdir, pki)
        config.control.listen = f"127.0.0.1:{port}"
        agent = make_agent(config)
        with pytest.raises(AgentStartupError) as info:
            await agent.run(handle_signals=False)
    assert f"control.listen '127.0.0.1:{port}': cannot bind" in str(info.value)
    assert not (workdir / "agent.sock").exists()

"""Fixtures for the Control API tests: a PKI, in-process agents with `[control]` (optionally with
gossip and emulated vLLM runtimes), and mutual-TLS clients for each identity."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import grpc
import grpc.aio
import pytest

from infermesh.agent import plugin as agent_plugin
from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.daemon import Agent
from infermesh.agent.tls import channel_credentials
from infermesh.core import builtin as core_plugin
from infermesh.core.config import (
    AgentConfig,
    Config,
    ControlConfig,
    GossipConfig,
    NodeConfig,
    RuntimeConfig,
)
from infermesh.core.plugins import PluginHost
from infermesh.core.proto import control_pb2_grpc
from infermesh.dev.profiles import GpuProfile
from infermesh.dev.vllm_emulator import EmulatorConfig, EmulatorServer, start_emulator
from infermesh.vllm import plugin as vllm_plugin

DEADLINE_S = 5.0

FAST_GPU = GpuProfile(
    name="test-fast",
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.001,
    step_per_seq_s=0.0,
    num_gpu_blocks=1024,
    max_model_len=2048,
)

FAST_GOSSIP: dict[str, Any] = {
    "probe_interval_s": 0.2,
    "probe_timeout_s": 0.1,
    "gossip_interval_s": 0.05,
    "push_pull_interval_s": 2.0,
}

USERS = {
    "n1": "node",
    "n2": "node",
    "ops": "operator",
    "grafana": "viewer",
    "alice": "admin",
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pki(workdir: Path) -> Path:
    directory = workdir / "certs"
    init_ca_dir(directory, days=2)
    for name, role in USERS.items():
        hosts = ["127.0.0.1"] if role == "node" else []
        issue_to_dir(directory, Identity(name, role), hosts=hosts)  # type: ignore[arg-type]
    return directory


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], what: str, timeout_s: float = DEADLINE_S
) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout_s`."""
    deadline = anyio.current_time() + timeout_s
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if anyio.current_time() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await anyio.sleep(0.02)


def build_agent(config: Config) -> Agent:
    host = PluginHost.load(
        entry_point_list=[],
        extra=[("core", core_plugin), ("agent", agent_plugin), ("vllm", vllm_plugin)],
    )
    return Agent(config, host)


class Mesh:
    """Agents, emulators and client channels started by one test, all stopped at its end."""

    def __init__(self, workdir: Path, pki: Path, tg: anyio.abc.TaskGroup) -> None:
        self.workdir = workdir
        self.pki = pki
        self._tg = tg
        self.agents: list[Agent] = []
        self.emulators: list[EmulatorServer] = []
        self.channels: list[grpc.aio.Channel] = []

    def config(
        self,
        node: str = "n1",
        *,
        runtimes: Sequence[str] = (),
        gossip_seeds: Sequence[str] | None = None,
    ) -> Config:
        gossip = GossipConfig()
        if gossip_seeds is not None:
            gossip = GossipConfig(
                enabled=True,
                bind="127.0.0.1:0",
                seeds=list(gossip_seeds),
                insecure=True,
                **FAST_GOSSIP,
            )
        return Config(
            node=NodeConfig(id=node, zone="z1", labels={"rack": "r7"}),
            agent=AgentConfig(
                socket=str(self.workdir / f"{node}.sock"),
                metrics_listen="",
                shutdown_grace_s=2.0,
                data_dir=str(self.workdir / f"{node}-data"),
            ),
            control=ControlConfig(
                listen="127.0.0.1:0",
                cert=str(self.pki / f"{node}.pem"),
                key=str(self.pki / f"{node}-key.pem"),
                ca=str(self.pki / "ca.pem"),
            ),
            runtimes=[
                RuntimeConfig(kind="vllm", url=url, poll_interval_s=0.05, timeout_s=1.0)
                for url in runtimes
            ],
            gossip=gossip,
        )

    async def agent(self, config: Config) -> Agent:
        # Built off the loop: the first build imports and reads files, slow on a busy machine.
        agent = await anyio.to_thread.run_sync(build_agent, config)
        await self._tg.start(partial(agent.run, handle_signals=False))
        self.agents.append(agent)
        return agent

    async def emulator(self, **options: Any) -> EmulatorServer:
        options.setdefault("profile", FAST_GPU)
        server = await start_emulator(EmulatorConfig(**options))
        self.emulators.append(server)
        return server

    def client(self, agent: Agent, user: str) -> control_pb2_grpc.ControlStub:
        """A Control client of `agent` presenting `user`'s certificate."""
        assert agent.control is not None
        assert agent.control.port
        credentials = channel_credentials(
            self.pki / "ca.pem", self.pki / f"{user}.pem", self.pki / f"{user}-key.pem"
        )
        channel = grpc.aio.secure_channel(f"127.0.0.1:{agent.control.port}", credentials)
        self.channels.append(channel)
        return control_pb2_grpc.ControlStub(channel)

    async def aclose(self) -> None:
        for channel in self.channels:
            await channel.close()
        for agent in self.agents:
            agent.request_stop()


@pytest.fixture
async def mesh(workdir: Path, pki: Path) -> AsyncIterator[Mesh]:
    async with anyio.create_task_group() as tg:
        started = Mesh(workdir, pki, tg)
        try:
            yield started
        finally:
            await started.aclose()
    for server in started.emulators:
        await server.aclose()

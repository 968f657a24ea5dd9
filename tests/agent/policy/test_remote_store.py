"""The `remote` policy store of a non-voter agent, against a real in-process voter agent serving
the Control API over mutual TLS: it reads the voter's policy, follows changes, survives the voter
restarting, starts without any reachable voter and catches up later, sends writes with the
caller it acts for, and names the config key of a bad setting."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from infermesh.agent import plugin as agent_plugin
from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.daemon import Agent, AgentStartupError
from infermesh.agent.policy.remote import (
    Backoff,
    PolicyPermissionError,
    RemoteOptions,
    RemotePolicyStore,
    write_calls,
    write_error,
)
from infermesh.agent.tls import CALLER, server_credentials
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, ControlConfig, NodeConfig, PolicyConfig
from infermesh.core.plugins import PluginHost
from infermesh.core.policy import (
    DeletePolicy,
    DrainNode,
    NotLeaderError,
    Pin,
    PolicyError,
    PolicyKind,
    PolicySet,
    PolicyStoreContext,
    SetPolicy,
    TenantQuota,
    UndrainNode,
    command_from_document,
)
from infermesh.core.proto import control_pb2, control_pb2_grpc
from infermesh.dev.harness import free_port

pytestmark = pytest.mark.anyio

DEADLINE_S = 8.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pki(workdir: Path) -> Path:
    directory = workdir / "certs"
    init_ca_dir(directory, days=2)
    issue_to_dir(directory, Identity("voter-1", "node"), hosts=["127.0.0.1"])
    issue_to_dir(directory, Identity("reader-4", "node"))
    issue_to_dir(directory, Identity("ops", "operator"))
    return directory


def make_agent(
    workdir: Path,
    pki: Path,
    name: str,
    *,
    listen: str = "",
    cert: str = "",
    policy: PolicyConfig | None = None,
) -> Agent:
    """An in-process agent `name` with its node certificate (`cert`, default its own) in
    `[control]`, serving the Control API when `listen` is set."""
    config = Config(
        node=NodeConfig(id=name),
        agent=AgentConfig(
            socket=str(workdir / f"{name}.sock"),
            metrics_listen="",
            shutdown_grace_s=2.0,
            data_dir=str(workdir / name),
        ),
        control=ControlConfig(
            listen=listen,
            cert=str(pki / f"{cert or name}.pem"),
            key=str(pki / f"{name}-key.pem"),
            ca=str(pki / "ca.pem"),
        ),
        policy=policy,
    )
    host = PluginHost.load(
        entry_point_list=[], extra=[("core", core_plugin), ("agent", agent_plugin)]
    )
    return Agent(config, host)


def voter(workdir: Path, pki: Path, listen: str = "127.0.0.1:0") -> Agent:
    """A voter agent (a one-node local store) serving the Control API on `listen`."""
    return make_agent(workdir, pki, "voter-1", listen=listen)


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[str]:
    """Run `agent` in the background; yields its Control API address."""
    async with anyio.create_task_group() as tg:
        await tg.start(partial(agent.run, handle_signals=False))
        try:
            assert agent.control is not None
            yield f"127.0.0.1:{agent.control.port}"
        finally:
            agent.request_stop()


def options(pki: Path, *voters: str, cert: str = "reader-4", **extra: Any) -> dict[str, Any]:
    return {
        "voters": list(voters),
        "cert": str(pki / f"{cert}.pem"),
        "key": str(pki / f"{cert}-key.pem"),
        "ca": str(pki / "ca.pem"),
        "watch_retry_s": 0.3,
        **extra,
    }


@asynccontextmanager
async def reader(workdir: Path, pki: Path, *voters: str) -> AsyncIterator[RemotePolicyStore]:
    context = PolicyStoreContext("reader-4", str(workdir / "reader"), options(pki, *voters))
    store = RemotePolicyStore(context)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


async def until_revision(store: RemotePolicyStore, revision: int) -> PolicySet:
    """The store's policy once it reached `revision`; fails after DEADLINE_S."""
    with anyio.move_on_after(DEADLINE_S):
        async for policy in store.watch():
            if policy.revision >= revision:
                return policy
    pytest.fail(f"the remote store did not reach revision {revision} within {DEADLINE_S} s")


async def test_a_reader_holds_the_voters_policy_and_names_the_voter_it_reads(
    workdir: Path, pki: Path
) -> None:
    agent = voter(workdir, pki)
    async with running(agent) as address:
        await agent.policy.submit(DrainNode("gpu-3", "kernel upgrade", 1.0))
        async with reader(workdir, pki, address) as store:
            policy = await store.get()
            status = await store.status()
    assert policy.drains["gpu-3"].reason == "kernel upgrade"
    assert (status.role, status.leader, status.voters, status.revision) == (
        "reader",
        address,
        (address,),
        1,
    )


async def test_a_change_made_on_the_voter_reaches_the_reader(workdir: Path, pki: Path) -> None:
    agent = voter(workdir, pki)
    async with running(agent) as address, reader(workdir, pki, address) as store:
        assert (await store.get()).revision == 0
        await agent.policy.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1",), 1)))
        policy = await until_revision(store, 1)
    assert policy.pins["llama"].nodes == ("gpu-1",)


async def test_the_reader_follows_a_voter_that_restarts(workdir: Path, pki: Path) -> None:
    first = voter(workdir, pki)
    async with running(first) as address:
        await first.policy.submit(DrainNode("gpu-1", "before", 1.0))
        store_cm = reader(workdir, pki, address)
        store = await store_cm.__aenter__()
    try:
        assert (await store.get()).drains["gpu-1"].reason == "before"  # kept while it is down
        second = voter(workdir, pki, listen=address)
        async with running(second):
            await second.policy.submit(DrainNode("gpu-2", "after", 2.0))
            policy = await until_revision(store, 2)
            status = await store.status()
    finally:
        await store_cm.__aexit__(None, None, None)
    assert sorted(policy.drains) == ["gpu-1", "gpu-2"]
    assert status.leader == address


async def test_a_reader_starts_without_a_reachable_voter_and_catches_up(
    workdir: Path, pki: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    async with reader(workdir, pki, address) as store:
        status = await store.status()
        assert (status.role, status.leader, status.revision) == ("reader", None, 0)
        with pytest.raises(NotLeaderError, match="no policy voter is reachable"):
            await store.submit(DrainNode("gpu-1"))
        agent = voter(workdir, pki, listen=address)
        async with running(agent):
            await agent.policy.submit(DrainNode("gpu-7", "late", 1.0))
            policy = await until_revision(store, 1)
    assert "gpu-7" in policy.drains


async def test_a_write_without_a_caller_is_refused_for_the_node_role(
    workdir: Path, pki: Path
) -> None:
    agent = voter(workdir, pki)
    async with running(agent) as address, reader(workdir, pki, address) as store:
        with pytest.raises(PermissionError) as refused:
            await store.submit(DrainNode("gpu-1", "maintenance"))
    assert isinstance(refused.value, PolicyPermissionError)
    assert f"the policy voter at {address} refused DrainNode" in str(refused.value)
    assert (await agent.policy.get()).revision == 0


async def test_a_write_made_for_a_caller_is_checked_against_the_callers_role(
    workdir: Path, pki: Path
) -> None:
    agent = voter(workdir, pki)
    async with running(agent) as address, reader(workdir, pki, address) as store:
        token = CALLER.set(Identity("ops", "operator"))
        try:
            drained = await store.submit(DrainNode("gpu-1", "maintenance"))
            pinned = await store.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-2",), 1)))
            with pytest.raises(PolicyPermissionError) as refused:
                await store.submit(SetPolicy(PolicyKind.QUOTAS, "team-a", TenantQuota(None, 4)))
            with pytest.raises(PolicyError, match=r"pins\['llama'\]\.min_replicas"):
                await store.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-2",), 3)))
        finally:
            CALLER.reset(token)
    assert drained.drains["gpu-1"].reason == "maintenance"
    assert pinned.pins["llama"] == Pin(("gpu-2",), 1)
    assert "SetPolicy" in str(refused.value)
    assert (await agent.policy.get()).revision == 2


class OlderVoter(control_pb2_grpc.ControlServicer):
    """A voter from before SubscribeEvents and PinModel: GetPolicy and SetPolicy only (every
    other RPC answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.policy = PolicySet()

    def document(self) -> control_pb2.PolicyDocument:
        return control_pb2.PolicyDocument(
            revision=self.policy.revision, json=json.dumps(self.policy.to_document())
        )

    async def GetPolicy(
        self, request: control_pb2.GetPolicyRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        return self.document()

    async def SetPolicy(
        self, request: control_pb2.SetPolicyRequest, context: Any
    ) -> control_pb2.PolicyDocument:
        document = {"op": "set", "kind": request.kind, "name": request.name}
        command = command_from_document({**document, "value": json.loads(request.value_json)})
        self.policy = self.policy.apply(command)
        return self.document()


@asynccontextmanager
async def older_voter(pki: Path) -> AsyncIterator[tuple[OlderVoter, str]]:
    """An OlderVoter serving mutual TLS on loopback, and its address."""
    older = OlderVoter()  # type: ignore[abstract]  # deliberately lacks the newer RPCs
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(older, server)
    credentials = server_credentials(pki / "voter-1.pem", pki / "voter-1-key.pem", pki / "ca.pem")
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield older, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_a_voter_without_subscribe_events_is_polled(workdir: Path, pki: Path) -> None:
    async with older_voter(pki) as (older, address), reader(workdir, pki, address) as store:
        older.policy = older.policy.apply(DrainNode("gpu-5", "old voter", 1.0))
        policy = await until_revision(store, 1)
    assert policy.drains["gpu-5"].reason == "old voter"


async def test_a_pin_is_set_with_set_policy_on_a_voter_without_pin_model(
    workdir: Path, pki: Path
) -> None:
    async with older_voter(pki) as (older, address), reader(workdir, pki, address) as store:
        pinned = await store.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1",), 1)))
    assert pinned.pins["llama"] == older.policy.pins["llama"] == Pin(("gpu-1",), 1)


# --------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"voters": []}, "policy.voters"),
        ({"voters": ["nohost"]}, "policy.voters[0]"),
        ({"cert": ""}, "control.cert"),
        ({"ca": None}, "control.ca"),
        ({"watch_retry_s": 0}, "policy.watch_retry_s"),
    ],
)
def test_bad_options_name_the_config_key(pki: Path, change: dict[str, Any], key: str) -> None:
    with pytest.raises(PolicyError) as info:
        RemoteOptions.from_mapping({**options(pki, "127.0.0.1:7960"), **change})
    assert str(info.value).startswith(f"{key}: ")


async def test_an_unreadable_certificate_fails_the_start_naming_control_cert(
    workdir: Path, pki: Path
) -> None:
    settings = options(pki, "127.0.0.1:7960")
    settings["cert"] = str(pki / "missing.pem")
    store = RemotePolicyStore(PolicyStoreContext("reader-4", str(workdir), settings))
    with pytest.raises(PolicyError, match=r"^control\.cert: cannot read the certificate .*missing"):
        await store.start()


async def test_a_certificate_that_is_not_a_node_certificate_is_refused(
    workdir: Path, pki: Path
) -> None:
    settings = options(pki, "127.0.0.1:7960", cert="ops")
    store = RemotePolicyStore(PolicyStoreContext("reader-4", str(workdir), settings))
    with pytest.raises(PolicyError, match=r"^control\.cert: .*ops\.pem is a operator certificate"):
        await store.start()


# --------------------------------------------------------------------------- decisions


def test_each_command_maps_to_the_control_rpc_an_operator_would_call() -> None:
    pin = SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1", "gpu-2"), 1))
    assert [m for m, _ in write_calls(pin)] == ["PinModel", "SetPolicy"]
    assert list(write_calls(pin)[0][1].nodes) == ["gpu-1", "gpu-2"]
    assert [m for m, _ in write_calls(DeletePolicy(PolicyKind.PINS, "llama"))] == [
        "UnpinModel",
        "DeletePolicy",
    ]
    assert [m for m, _ in write_calls(DeletePolicy(PolicyKind.QUOTAS, "t"))] == ["DeletePolicy"]
    assert [m for m, _ in write_calls(DrainNode("gpu-1", "x"))] == ["DrainNode"]
    assert [m for m, _ in write_calls(UndrainNode("gpu-1"))] == ["UndrainNode"]


def test_voter_refusals_become_store_errors_with_the_voters_words() -> None:
    invalid = write_error("v:1", "SetPolicy", grpc.StatusCode.INVALID_ARGUMENT, "pins: bad")
    assert isinstance(invalid, PolicyError)
    assert str(invalid) == "pins: bad"
    denied = write_error("v:1", "SetPolicy", grpc.StatusCode.PERMISSION_DENIED, "role viewer")
    assert isinstance(denied, PermissionError)
    assert "v:1 refused SetPolicy: role viewer" in str(denied)
    lost = write_error("v:1", "DrainNode", grpc.StatusCode.UNAVAILABLE, "no leader")
    assert isinstance(lost, NotLeaderError)
    assert "UNAVAILABLE: no leader" in str(lost)


def test_the_retry_wait_doubles_up_to_the_cap_and_resets() -> None:
    backoff = Backoff(cap_s=0.5)
    assert [backoff.next_delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.next_delay() == 0.1


# --------------------------------------------------------------------------- in the agent


def reader_agent(workdir: Path, pki: Path, *voters: str, cert: str = "") -> Agent:
    """A non-voter agent: `[policy] voters` and the node certificate in `[control]`."""
    policy = PolicyConfig(voters=list(voters), watch_retry_s=0.3)
    return make_agent(workdir, pki, "reader-4", cert=cert, policy=policy)


async def test_an_agent_with_policy_voters_scores_with_the_voters_policy(
    workdir: Path, pki: Path
) -> None:
    source = voter(workdir, pki)
    async with running(source) as address:
        follower = reader_agent(workdir, pki, address)
        assert isinstance(follower.policy, RemotePolicyStore)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(follower.run, handle_signals=False))
            try:
                await source.policy.submit(DrainNode("gpu-3", "kernel upgrade", 1.0))
                deadline = anyio.current_time() + DEADLINE_S
                while "gpu-3" not in follower.engine.policy.drains:  # the agent's own scoring
                    if anyio.current_time() > deadline:
                        pytest.fail("the voter's drain never reached the reader's scoring")
                    await anyio.sleep(0.02)
                status = await follower.policy.status()
            finally:
                follower.request_stop()
    assert (status.role, status.leader) == ("reader", address)


async def test_an_agent_whose_node_certificate_is_missing_does_not_start(
    workdir: Path, pki: Path
) -> None:
    agent = reader_agent(workdir, pki, "127.0.0.1:7960", cert="missing")
    with pytest.raises(AgentStartupError, match=r"control\.cert: cannot read the certificate"):
        await agent.run(handle_signals=False)

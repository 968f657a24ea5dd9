"""The State service's GetPolicy: the policy the agent's scoring follows, for routers that rank
locally, over a real Unix socket."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from infermesh.agent.api.state import StateService
from infermesh.core.policy import DrainNode, PolicySet
from infermesh.core.proto import state_pb2, state_pb2_grpc
from infermesh.core.scoring.state import StateStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def get_policy(service: StateService, socket_path: Path) -> state_pb2.PolicySnapshot:
    server = grpc.aio.server()
    state_pb2_grpc.add_StateServicer_to_server(service, server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
            reply: state_pb2.PolicySnapshot = await state_pb2_grpc.StateStub(channel).GetPolicy(
                state_pb2.ListRequest(), timeout=5.0
            )
            return reply
    finally:
        await server.stop(None)


async def test_get_policy_returns_the_sources_policy_and_revision(workdir: Path) -> None:
    policy = PolicySet().apply(DrainNode("n2", reason="maintenance", since=1.0))
    current = [policy]
    service = StateService(StateStore(), policy_source=lambda: current[0])

    reply = await get_policy(service, workdir / "state.sock")
    assert reply.revision == 1
    got = PolicySet.from_document(json.loads(reply.json))
    assert got == policy
    assert got.drains["n2"].reason == "maintenance"

    current[0] = PolicySet()
    reply = await get_policy(service, workdir / "state2.sock")
    assert (reply.revision, PolicySet.from_document(json.loads(reply.json))) == (0, PolicySet()), (
        "each call asks the source afresh"
    )


async def test_without_a_policy_source_get_policy_is_empty_at_revision_0(workdir: Path) -> None:
    reply = await get_policy(StateService(StateStore()), workdir / "state.sock")
    assert reply.revision == 0
    assert PolicySet.from_document(json.loads(reply.json)) == PolicySet()

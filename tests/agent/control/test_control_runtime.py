"""LoadModel/UnloadModel through the agent's Control API on an emulated vLLM (LoRA adapters):
the result and the runtime's refusals as gRPC statuses, the events it makes, and a load
forwarded from one agent to the agent of the node that runs the model."""

from __future__ import annotations

import grpc
import grpc.aio
import pytest

from infermesh.agent.daemon import Agent
from infermesh.agent.runtime_ops import (
    LocalRuntime,
    OperationError,
    pick_runtime,
    runtime_error_status,
)
from infermesh.core.proto import control_pb2, control_pb2_grpc

from .conftest import DEADLINE_S, Mesh, wait_until

pytestmark = pytest.mark.anyio

OPS_URI = "spiffe://infermesh/operator/ops"


async def model_names(client: control_pb2_grpc.ControlStub) -> list[str]:
    listing = await client.ListModels(control_pb2.ListModelsRequest(), timeout=DEADLINE_S)
    return [m.name for m in listing.models if any(t.loaded for t in m.targets)]


def events_of(agent: Agent, after_seq: int, action: str, subject: str) -> list[dict[str, str]]:
    return [
        dict(e.attributes)
        for e in agent.events.since(after_seq, {"model"})
        if (e.action, e.subject) == (action, subject)
    ]


async def test_an_operator_loads_and_unloads_a_lora_adapter_and_the_events_show_it(
    mesh: Mesh,
) -> None:
    server = await mesh.emulator()
    agent = await mesh.agent(mesh.config("n1", runtimes=[server.url]))
    ops = mesh.client(agent, "ops")
    await wait_until(lambda: bool(agent.store.model_states()), "the emulator's base model")
    start = agent.events.last_seq
    following = ops.SubscribeEvents(
        control_pb2.SubscribeEventsRequest(after_seq=start, follow=True, kinds=["model"])
    )

    reply = await ops.LoadModel(
        control_pb2.LoadModelRequest(node="n1", model="sql", source="/models/sql-lora"),
        timeout=DEADLINE_S,
    )
    assert (reply.node, reply.model, reply.runtime) == ("n1", "sql", server.url)
    assert reply.message == f"loaded sql on {server.url}"
    # The operation's own event comes first, with who asked for it.
    first = await anext(aiter(following))
    assert (first.kind, first.action, first.subject, first.node) == ("model", "loaded", "sql", "n1")
    assert first.attributes["by"] == OPS_URI
    assert first.attributes["source"] == "/models/sql-lora"
    following.cancel()

    # Then the runtime's adapter list shows it: the mesh serves it and says so.
    async def sql_served() -> bool:
        return "sql" in await model_names(ops)

    await wait_until(sql_served, "ListModels to show the sql adapter")
    await wait_until(
        lambda: any("by" not in a for a in events_of(agent, start, "loaded", "sql")),
        "a loaded event from the runtime's adapter list",
    )

    await ops.UnloadModel(control_pb2.UnloadModelRequest(node="n1", model="sql"), timeout=5)
    (unloaded,) = events_of(agent, start, "unloaded", "sql")[:1]
    assert unloaded["by"] == OPS_URI

    async def sql_gone() -> bool:
        return "sql" not in await model_names(ops)

    await wait_until(sql_gone, "ListModels to drop the sql adapter")


async def test_the_runtimes_refusals_are_clear_statuses_and_failed_events(mesh: Mesh) -> None:
    server = await mesh.emulator(max_loras=1)
    agent = await mesh.agent(mesh.config("n1", runtimes=[server.url]))
    ops, viewer = mesh.client(agent, "ops"), mesh.client(agent, "grafana")
    load = control_pb2.LoadModelRequest(node="n1", model="sql", source="/models/sql-lora")
    await ops.LoadModel(load, timeout=DEADLINE_S)

    cases = [
        (
            ops.LoadModel(load, timeout=DEADLINE_S),
            grpc.StatusCode.FAILED_PRECONDITION,
            "HTTP 400: The lora adapter 'sql' has already been loaded.",
        ),
        (
            ops.UnloadModel(
                control_pb2.UnloadModelRequest(node="n1", model="nope"), timeout=DEADLINE_S
            ),
            grpc.StatusCode.NOT_FOUND,
            "HTTP 404: The lora adapter 'nope' cannot be found.",
        ),
        (
            ops.LoadModel(
                control_pb2.LoadModelRequest(node="n1", model="b", source="/b", runtime="x"),
                timeout=DEADLINE_S,
            ),
            grpc.StatusCode.NOT_FOUND,
            f"node n1 has no runtime 'x' that can load models; its runtimes with model "
            f"control: {server.url}",
        ),
        (
            ops.LoadModel(control_pb2.LoadModelRequest(model="sql"), timeout=DEADLINE_S),
            grpc.StatusCode.INVALID_ARGUMENT,
            "node: required (the node whose runtime to use)",
        ),
        (
            ops.LoadModel(control_pb2.LoadModelRequest(node="gpu-9", model="a"), timeout=5),
            grpc.StatusCode.FAILED_PRECONDITION,
            "node gpu-9 is not this agent's node (n1) and this agent cannot forward the call",
        ),
        (
            viewer.LoadModel(load, timeout=DEADLINE_S),
            grpc.StatusCode.PERMISSION_DENIED,
            "grafana has role viewer, which may not call LoadModel",
        ),
    ]
    for call, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == code
        assert message in refused.value.details()
        assert "Traceback" not in refused.value.details()

    (failed,) = events_of(agent, 0, "load_failed", "sql")
    assert "has already been loaded" in failed["error"]
    (failed,) = events_of(agent, 0, "unload_failed", "nope")
    assert failed["by"] == OPS_URI


async def test_a_node_without_a_runtime_that_loads_models_says_so(mesh: Mesh) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    ops = mesh.client(agent, "ops")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ops.LoadModel(
            control_pb2.LoadModelRequest(node="n1", model="sql", source="/s"), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details().startswith("node n1 has no runtime that can load or unload")


async def test_a_load_for_another_node_is_forwarded_to_its_agent_on_behalf_of_the_caller(
    mesh: Mesh,
) -> None:
    server = await mesh.emulator()
    first = await mesh.agent(mesh.config("n1", gossip_seeds=[]))
    assert first.gossip is not None
    second = await mesh.agent(
        mesh.config("n2", runtimes=[server.url], gossip_seeds=[first.gossip.address])
    )
    ops = mesh.client(first, "ops")

    async def n2_reachable() -> bool:
        listing = await ops.ListNodes(control_pb2.ListNodesRequest(), timeout=DEADLINE_S)
        nodes = {n.name: n for n in listing.nodes}
        return "n2" in nodes and "control" in nodes["n2"].apis and bool(nodes["n2"].targets)

    await wait_until(n2_reachable, "n1 to see n2's Control API and target", timeout_s=15)
    assert [e.subject for e in first.events.since(0, {"node"}) if e.action == "joined"] == ["n2"]

    reply = await ops.LoadModel(
        control_pb2.LoadModelRequest(node="n2", model="sql", source="/models/sql"),
        timeout=DEADLINE_S,
    )
    assert (reply.node, reply.runtime) == ("n2", server.url)
    # n2 did it, for the operator (not for n1's node certificate that carried the call).
    (done,) = events_of(second, 0, "loaded", "sql")[:1]
    assert done["by"] == OPS_URI

    with pytest.raises(grpc.aio.AioRpcError) as relayed:
        await ops.UnloadModel(control_pb2.UnloadModelRequest(node="n2", model="nope"), timeout=5)
    assert relayed.value.code() == grpc.StatusCode.NOT_FOUND
    assert relayed.value.details().startswith("node n2 (127.0.0.1:")
    assert "The lora adapter 'nope' cannot be found." in relayed.value.details()

    # n1 learns of the adapter through gossip and records it too.
    await wait_until(
        lambda: bool(events_of(first, 0, "loaded", "sql")), "n1 to record the adapter on n2"
    )


class _Runtime:
    async def load(self, model: str, source: str) -> None: ...

    async def unload(self, model: str) -> None: ...

    async def warm(self, model: str) -> None: ...


def test_a_node_with_several_runtimes_needs_one_named_by_url_or_name() -> None:
    runtimes = [
        LocalRuntime("a", "http://10.0.0.1:8000", _Runtime()),
        LocalRuntime("b", "http://10.0.0.1:8001/v1", _Runtime()),
    ]
    with pytest.raises(OperationError) as several:
        pick_runtime("n1", runtimes, "")
    assert several.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(several.value) == (
        "node n1 has 2 runtimes that can load models; choose one with runtime: "
        "http://10.0.0.1:8000, http://10.0.0.1:8001/v1"
    )
    assert pick_runtime("n1", runtimes, "http://10.0.0.1:8001/").name == "b"
    assert pick_runtime("n1", runtimes, "http://10.0.0.1:8000/v1").name == "a"
    assert pick_runtime("n1", runtimes, "b").name == "b"


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("vLLM at u could not unload LoRA adapter 'x': HTTP 404: cannot be found", "NOT_FOUND"),
        ("vLLM at u could not load ...: HTTP 400: already loaded", "FAILED_PRECONDITION"),
        (
            "... HTTP 404: Not Found (the LoRA routes are missing: start vLLM with ...)",
            "FAILED_PRECONDITION",
        ),
        ("vLLM at u could not load ...: HTTP 500: engine died", "UNAVAILABLE"),
        ("vLLM at u could not load ...: no answer from u in 5s", "UNAVAILABLE"),
    ],
)
def test_a_runtimes_refusal_maps_to_the_status_an_operator_expects(message: str, code: str) -> None:
    assert runtime_error_status(message) == grpc.StatusCode[code]

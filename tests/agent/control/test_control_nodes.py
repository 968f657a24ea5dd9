"""ListNodes/GetNode, ListModels/GetModel and PinModel/UnpinModel over the agent's Control API,
and who may act on behalf of whom (`infermesh-on-behalf-of`)."""

from __future__ import annotations

import time

import grpc
import grpc.aio
import pytest

from infermesh.agent.api.caller import ON_BEHALF_OF
from infermesh.agent.daemon import Agent, node_meta
from infermesh.core.config import Config, ControlConfig, GossipConfig, NodeConfig
from infermesh.core.model import GpuKey, GpuStateDelta, ModelStateDelta, TargetKey
from infermesh.core.proto import control_pb2

from .conftest import DEADLINE_S, Mesh

pytestmark = pytest.mark.anyio

N1_VLLM = "http://10.0.0.1:8000"
N2_VLLM = "http://10.0.0.2:8000"


def ageless(message: control_pb2.Node | control_pb2.Model) -> bytes:
    """The message without the ages (which grow between two calls), for comparison."""
    copy = type(message).FromString(message.SerializeToString())
    for item in [*copy.targets, *getattr(copy, "gpus", [])]:
        item.age_s = 0.0
    return copy.SerializeToString(deterministic=True)


def add_target(agent: Agent, node: str, endpoint: str, model: str, **changes: object) -> None:
    key = TargetKey(model=model, node=node, endpoint=endpoint)
    previous = agent.store.get_model(key)
    version = previous.version + 1 if previous is not None else 1
    fields = {"last_updated": time.time(), **changes}
    assert agent.store.apply_model_delta(ModelStateDelta(key, version, fields))


async def test_list_nodes_shows_this_agent_with_its_apis_targets_gpus_and_drain(
    mesh: Mesh,
) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    add_target(agent, "n1", N1_VLLM, "llama", running=2.0, adapters=("sql",))
    gpu = GpuKey(node="n1", gpu_uuid="GPU-1")
    agent.store.apply_gpu_delta(
        GpuStateDelta(gpu, 1, {"name": "H100", "utilization": 0.5, "last_updated": time.time()})
    )
    ops, viewer = mesh.client(agent, "ops"), mesh.client(agent, "grafana")
    await ops.DrainNode(
        control_pb2.DrainNodeRequest(node="n1", reason="kernel upgrade"), timeout=DEADLINE_S
    )

    listing = await viewer.ListNodes(control_pb2.ListNodesRequest(), timeout=DEADLINE_S)

    assert listing.answered_by == "n1"
    assert listing.policy_revision == 1
    assert listing.policy_store.backend == "local"
    assert listing.policy_store.revision == 1
    (node,) = listing.nodes
    assert (node.name, node.state, node.is_self, node.zone) == ("n1", "alive", True, "z1")
    assert dict(node.labels) == {"rack": "r7"}
    assert agent.control is not None
    # Bound to port 0, the Control API is advertised at the port it got.
    assert node.apis["control"] == f"127.0.0.1:{agent.control.port}"
    assert (node.drained, node.drain_reason) == (True, "kernel upgrade")
    assert node.drained_since > 0
    (target,) = node.targets
    assert (target.model, target.endpoint, target.running) == ("llama", N1_VLLM, 2.0)
    assert list(target.adapters) == ["sql"]
    assert 0 <= target.age_s < 60
    (card,) = node.gpus
    assert (card.uuid, card.name, card.utilization, card.healthy) == ("GPU-1", "H100", 0.5, True)

    one = await viewer.GetNode(control_pb2.GetNodeRequest(node="n1"), timeout=DEADLINE_S)
    assert ageless(one) == ageless(node)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await viewer.GetNode(control_pb2.GetNodeRequest(node="gpu-9"), timeout=DEADLINE_S)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details() == "node 'gpu-9' is not known to n1; known nodes: n1"


async def test_models_list_base_models_lora_adapters_and_pins_and_unpin_removes_the_pin(
    mesh: Mesh,
) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    add_target(agent, "n1", N1_VLLM, "llama", adapters=("sql",))
    add_target(agent, "n2", N2_VLLM, "llama")
    ops, viewer = mesh.client(agent, "ops"), mesh.client(agent, "grafana")

    await ops.PinModel(
        control_pb2.PinModelRequest(model="llama", nodes=["n2"], min_replicas=1),
        timeout=DEADLINE_S,
    )
    await ops.PinModel(control_pb2.PinModelRequest(model="ghost", nodes=["n1"]), timeout=5)
    models = await viewer.ListModels(control_pb2.ListModelsRequest(), timeout=DEADLINE_S)

    assert [m.name for m in models.models] == ["ghost", "llama", "sql"]
    ghost, llama, sql = models.models
    assert (list(ghost.targets), ghost.healthy_targets, list(ghost.pinned_nodes)) == ([], 0, ["n1"])
    assert [(t.node, t.endpoint) for t in llama.targets] == [("n1", N1_VLLM), ("n2", N2_VLLM)]
    assert (llama.healthy_targets, list(llama.pinned_nodes), llama.min_replicas) == (1, ["n2"], 1)
    # The LoRA adapter is served by the base target that lists it.
    assert [(t.node, t.model, list(t.adapters)) for t in sql.targets] == [("n1", "llama", ["sql"])]
    assert sql.healthy_targets == 1
    request = control_pb2.GetModelRequest(model="llama")
    assert ageless(await viewer.GetModel(request, timeout=DEADLINE_S)) == ageless(llama)

    await ops.UnpinModel(control_pb2.UnpinModelRequest(model="llama"), timeout=DEADLINE_S)
    llama = await viewer.GetModel(request, timeout=DEADLINE_S)
    assert (llama.healthy_targets, list(llama.pinned_nodes)) == (2, [])

    with pytest.raises(grpc.aio.AioRpcError) as not_pinned:
        await ops.UnpinModel(control_pb2.UnpinModelRequest(model="llama"), timeout=DEADLINE_S)
    assert not_pinned.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model llama is not pinned; pinned models: ghost" in not_pinned.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await viewer.GetModel(control_pb2.GetModelRequest(model="mistral"), timeout=DEADLINE_S)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'mistral' is not served by any target and not pinned" in unknown.value.details()


async def test_a_bad_pin_names_the_field_and_a_viewer_may_not_pin(mesh: Mesh) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    ops, viewer = mesh.client(agent, "ops"), mesh.client(agent, "grafana")
    too_many = control_pb2.PinModelRequest(model="llama", nodes=["n1"], min_replicas=2)
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await ops.PinModel(too_many, timeout=DEADLINE_S)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pins['llama'].min_replicas: must be <= the 1 pinned nodes, got 2" in (
        invalid.value.details()
    )
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await viewer.PinModel(
            control_pb2.PinModelRequest(model="llama", nodes=["n1"]), timeout=DEADLINE_S
        )
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert denied.value.details() == "grafana has role viewer, which may not call PinModel"
    assert (await agent.policy.get()).revision == 0


async def test_a_node_certificate_acts_on_behalf_of_the_caller_it_names(mesh: Mesh) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    node = mesh.client(agent, "n2")
    drain = control_pb2.DrainNodeRequest(node="n1", reason="forwarded")

    with pytest.raises(grpc.aio.AioRpcError) as as_viewer:
        await node.DrainNode(
            drain,
            metadata=((ON_BEHALF_OF, "spiffe://infermesh/viewer/grafana"),),
            timeout=DEADLINE_S,
        )
    assert as_viewer.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert as_viewer.value.details() == (
        "grafana has role viewer, which may not call DrainNode (forwarded by n2)"
    )

    done = await node.DrainNode(
        drain, metadata=((ON_BEHALF_OF, "spiffe://infermesh/operator/ops"),), timeout=DEADLINE_S
    )
    assert done.revision == 1

    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        await node.ListNodes(
            control_pb2.ListNodesRequest(), metadata=((ON_BEHALF_OF, "ops"),), timeout=DEADLINE_S
        )
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not an identity URI spiffe://infermesh/<role>/<name>" in malformed.value.details()


async def test_only_node_certificates_may_act_on_behalf_of_another_identity(mesh: Mesh) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    operator = mesh.client(agent, "ops")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await operator.SetPolicy(
            control_pb2.SetPolicyRequest(kind="acls", name="ops", value_json='{"role": "admin"}'),
            metadata=((ON_BEHALF_OF, "spiffe://infermesh/admin/alice"),),
            timeout=DEADLINE_S,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == (
        "only node certificates may act on behalf of another identity; "
        "ops's certificate has role operator"
    )
    assert (await agent.policy.get()).revision == 0


def test_the_control_api_is_advertised_at_the_gossip_host_and_its_bound_port() -> None:
    config = Config(
        node=NodeConfig(id="n1"),
        control=ControlConfig(listen="0.0.0.0:0"),
        gossip=GossipConfig(enabled=True, bind="10.0.0.5:7946"),
    )
    assert "control" not in dict(node_meta(config, gossip_host="10.0.0.5").apis)
    meta = node_meta(config, gossip_host="10.0.0.5", control_port=7960)
    assert dict(meta.apis)["control"] == "10.0.0.5:7960"
    config.control.listen = "10.0.0.5:7961"
    assert dict(node_meta(config).apis)["control"] == "10.0.0.5:7961"

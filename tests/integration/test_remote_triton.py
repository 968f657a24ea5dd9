"""A Triton on another node: two agents joined by gossip, an emulated Triton on node n2 only, and
routers on n1 (local and agent scoring) that have no [[runtimes]] table for it. The target's own
labels (`transport = "kserve-http"`, `kserve_grpc`) tell them how to reach it, so KServe v2 HTTP
and gRPC calls through n1's routers are answered by n2's Triton."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from infermesh.core.convert import request_features_to_pb
from infermesh.core.model import RequestFeatures
from infermesh.core.proto import kserve_pb2, kserve_pb2_grpc, scoring_pb2, scoring_pb2_grpc
from infermesh.dev.cluster import LocalCluster
from infermesh.dev.harness import (
    ManagedProcess,
    MeshSpec,
    ReplicaSpec,
    free_port,
    infermesh_command,
    wait_http_ok,
)

from .conftest import MODEL, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

GOSSIP_OPTIONS: tuple[tuple[str, float], ...] = (
    ("probe_interval_s", 0.3),
    ("probe_timeout_s", 0.2),
    ("gossip_interval_s", 0.1),
)
INFER = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [4] * 16},
    ]
}


class Routers:
    """n1's routers: `urls[mode]` and `grpc[mode]` (KServe gRPC ingress) per scoring mode."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.urls: dict[str, str] = {}
        self.grpc: dict[str, str] = {}


@pytest.fixture(scope="module")
async def routers() -> AsyncIterator[Routers]:
    local_grpc = free_port()
    n1 = MeshSpec(
        replicas=(ReplicaSpec("instant", "n1-r0"),),
        model=MODEL,
        node_id="n1",
        poll_interval_s=0.2,
        ready_timeout_s=90.0,
        env=(("INFERMESH_ROUTER__GRPC_LISTEN", f"127.0.0.1:{local_grpc}"),),
    )
    n2 = MeshSpec(
        replicas=(ReplicaSpec("instant", "n2-triton", kind="triton"),),
        node_id="n2",
        poll_interval_s=0.2,
        ready_timeout_s=90.0,
        start_router=False,
    )
    async with LocalCluster([n1, n2], gossip_options=GOSSIP_OPTIONS, secure=False) as cluster:
        node = cluster.node("n1")
        running = Routers(cluster)
        running.urls["local"] = node.router_url
        running.grpc["local"] = f"127.0.0.1:{local_grpc}"
        # A second router on n1 that asks the agent to rank (router.scoring = "agent").
        agent_port, agent_grpc = free_port(), free_port()
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "INFERMESH_ROUTER__LISTEN": f"127.0.0.1:{agent_port}",
            "INFERMESH_ROUTER__GRPC_LISTEN": f"127.0.0.1:{agent_grpc}",
            "INFERMESH_ROUTER__SCORING": "agent",
        }
        env.pop("INFERMESH_CONFIG", None)
        router = ManagedProcess(
            name="router agent-mode",
            argv=[*infermesh_command(), "router", "run", "--config", str(node.config_path)],
            log_path=node.workdir / "router-agent-mode.log",
        )
        await router.start(env)
        try:
            url = f"http://127.0.0.1:{agent_port}"
            await wait_http_ok(f"{url}/health", router, time.monotonic() + 60)
            running.urls["agent"] = url
            running.grpc["agent"] = f"127.0.0.1:{agent_grpc}"
            yield running
        finally:
            await router.stop(6.0)


async def test_the_agent_ranks_the_remote_triton_with_its_transport_and_labels(
    routers: Routers,
) -> None:
    node = routers.cluster.node("n1")
    triton = routers.cluster.node("n2").replicas[0]
    async with grpc.aio.insecure_channel(f"unix://{node.socket_path}") as channel:
        stub = scoring_pb2_grpc.ScoringStub(channel)

        async def ranked() -> bool:
            reply = await stub.ScoreTargets(
                scoring_pb2.ScoreTargetsRequest(
                    request=request_features_to_pb(RequestFeatures(model="simple"))
                ),
                timeout=5,
            )
            return bool(reply.targets)

        await wait_for(ranked, "n1's agent to learn n2's Triton by gossip", timeout_s=60)
        reply = await stub.ScoreTargets(
            scoring_pb2.ScoreTargetsRequest(
                request=request_features_to_pb(RequestFeatures(model="simple"))
            ),
            timeout=5,
        )
    (target,) = reply.targets
    assert target.key.node == "n2"
    assert target.transport == "kserve-http"  # n1 has no [[runtimes]] table for it
    assert target.labels["transport"] == "kserve-http"
    assert target.labels["kserve_grpc"] == triton.grpc_target
    assert target.labels["runtime"] == "triton"


@pytest.mark.parametrize("mode", ["local", "agent"])
async def test_kserve_http_and_grpc_reach_the_triton_on_the_other_node(
    routers: Routers, mode: str
) -> None:
    url = routers.urls[mode]
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def simple_ready() -> bool:
            async with http.get(f"{url}/v2/models/simple/ready") as answer:
                return answer.status == 200

        await wait_for(simple_ready, f"the {mode}-mode router to route 'simple' to n2", 60)
        async with http.post(f"{url}/v2/models/simple/infer", json=INFER) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
    outputs = {out["name"]: out["data"] for out in body["outputs"]}
    assert outputs["OUTPUT0"] == [i + 4 for i in range(16)]

    async with grpc.aio.insecure_channel(routers.grpc[mode]) as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = kserve_pb2.ModelInferRequest(model_name="simple")
        for name in ("INPUT0", "INPUT1"):
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, "INT32"
            tensor.shape.extend([1, 16])
        request.raw_input_contents.extend(
            [struct.pack("<16i", *range(16)), struct.pack("<16i", *[4] * 16)]
        )
        reply = await stub.ModelInfer(request, timeout=10)
    assert struct.unpack("<16i", reply.raw_output_contents[1]) == tuple(i - 4 for i in range(16))

"""The local-mesh harness with emulated Triton servers and an emulated dcgm-exporter: the config
it writes, and a real mesh whose router answers KServe v2 (HTTP and gRPC) and whose agent reads
the emulated GPUs."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import grpc_health.v1.health_pb2_grpc  # noqa: F401  (the harness imports it on the loop)
import pytest

from infermesh.core.config import load_config
from infermesh.core.proto import kserve_pb2, kserve_pb2_grpc
from infermesh.dev.harness import (
    LocalMesh,
    MeshSpec,
    ReplicaSpec,
    RunningReplica,
    emulated_gpu_uuid,
    mesh_spec,
    render_config,
)

pytestmark = pytest.mark.anyio


async def wait_for(
    condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.1)


INFER = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [2] * 16},
    ]
}


def test_triton_replicas_and_the_dcgm_exporter_are_in_the_generated_config(
    tmp_path: Path,
) -> None:
    spec = mesh_spec(replicas=1, profiles=["h100"], model="m", tritons=2, dcgm=True)
    assert [(r.kind, r.name) for r in spec.replicas] == [
        ("vllm", "h100-0"),
        ("triton", "triton-0"),
        ("triton", "triton-1"),
    ]
    gpus = {r.name: (emulated_gpu_uuid("dev-node", r.name),) for r in spec.replicas}
    replicas = [
        RunningReplica(
            spec=r,
            port=9001 + i,
            grpc_port=9101 + i if r.kind == "triton" else 0,
            metrics_port=9201 + i if r.kind == "triton" else 0,
            gpus=gpus[r.name],
        )
        for i, r in enumerate(spec.replicas)
    ]
    path = tmp_path / "infermesh.toml"
    path.write_text(
        render_config(
            spec,
            replicas,
            socket_path=tmp_path / "agent.sock",
            agent_metrics_port=9464,
            router_port=8088,
            router_grpc_port=8089,
            dcgm_url="http://127.0.0.1:9400/metrics",
        )
    )

    config = load_config(path, environ={})

    assert config.router.grpc_listen == "127.0.0.1:8089"
    assert [(r.kind, r.name, r.url, tuple(r.gpus)) for r in config.runtimes] == [
        ("vllm", "h100-0", "http://127.0.0.1:9001", gpus["h100-0"]),
        ("triton", "triton-0", "http://127.0.0.1:9002", gpus["triton-0"]),
        ("triton", "triton-1", "http://127.0.0.1:9003", gpus["triton-1"]),
    ]
    assert config.runtimes[1].options == {
        "metrics_url": "http://127.0.0.1:9202/metrics",
        "grpc_url": "127.0.0.1:9102",
    }
    assert [(g.kind, g.url) for g in config.gpus] == [("dcgm", "http://127.0.0.1:9400/metrics")]


def test_bad_replica_kinds_and_empty_meshes_are_refused() -> None:
    with pytest.raises(ValueError, match="kind must be one of vllm, triton"):
        ReplicaSpec("h100", "x", kind="tgi")
    with pytest.raises(ValueError, match="at least one replica"):
        mesh_spec(replicas=0, profiles=["h100"], tritons=0)


@pytest.mark.integration
async def test_a_mesh_with_a_triton_replica_and_dcgm_answers_kserve_and_shows_gpus() -> None:
    spec = MeshSpec(
        replicas=(ReplicaSpec("h100", "llm"), ReplicaSpec("h100", "trt", kind="triton")),
        dcgm=True,
        poll_interval_s=0.2,
        ready_timeout_s=90,
    )
    timeout = aiohttp.ClientTimeout(total=10)
    async with LocalMesh(spec) as mesh, aiohttp.ClientSession(timeout=timeout) as http:
        triton = next(r for r in mesh.replicas if r.kind == "triton")
        gpu_of = {r.name: r.gpus[0] for r in mesh.replicas}
        assert gpu_of["trt"] == emulated_gpu_uuid("dev-node", "trt")

        async def simple_ready() -> bool:
            async with http.get(f"{mesh.router_url}/v2/models/simple/ready") as answer:
                return answer.status == 200

        await wait_for(simple_ready, "the router to route Triton's model 'simple'")
        async with http.post(f"{mesh.router_url}/v2/models/simple/infer", json=INFER) as response:
            assert response.status == 200, await response.text()
            body = await response.json()
        outputs = {out["name"]: out["data"] for out in body["outputs"]}
        assert outputs["OUTPUT0"] == [i + 2 for i in range(16)]

        async with grpc.aio.insecure_channel(mesh.router_grpc_target) as channel:
            stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = kserve_pb2.ModelInferRequest(model_name="simple")
            for name in ("INPUT0", "INPUT1"):
                tensor = request.inputs.add()
                tensor.name, tensor.datatype = name, "INT32"
                tensor.shape.extend([1, 16])
            request.raw_input_contents.extend(
                [struct.pack("<16i", *range(16)), struct.pack("<16i", *[2] * 16)]
            )
            answer = await stub.ModelInfer(request, timeout=10)
            assert struct.unpack("<16i", answer.raw_output_contents[1]) == tuple(
                i - 2 for i in range(16)
            )

        # The agent reads both emulated GPUs from the dcgm-exporter emulator.
        async def gpus_on_agent_metrics() -> bool:
            async with http.get(mesh.agent_metrics_url) as answer:
                page = await answer.text()
            series = [
                line for line in page.splitlines() if line.startswith("infermesh_agent_gpu_temp")
            ]
            return all(any(f'gpu_uuid="{u}"' in line for line in series) for u in gpu_of.values())

        await wait_for(gpus_on_agent_metrics, "the agent's /metrics to show the emulated GPUs")

        # A throttled GPU slows the Triton replica on it (the dcgm emulator knows the mapping).
        control = f"{mesh.dcgm_url}/control/gpus/{gpu_of['trt']}"
        async with http.post(control, json={"state": "throttle"}) as throttled:
            assert throttled.status == 200, await throttled.text()
            updates = (await throttled.json())["speed_updates"]
        assert [u["status"] for u in updates] == [200]
        async with http.get(f"{triton.url}/infermesh/dev/slowdown") as slowdown:
            assert (await slowdown.json())["factor"] == pytest.approx(2.0)

"""KServe v2 through a real router and agent: emulated Tritons as `kind = "triton"` runtimes,
reached with httpx (HTTP) and grpcio stubs (gRPC ingress on router.grpc_listen)."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import grpc
import httpx2
import pytest

from infermesh.core.proto import kserve_pb2, kserve_pb2_grpc
from infermesh.dev.harness import LocalMesh, ReplicaSpec, free_port
from infermesh.dev.triton_emulator import TritonEmulator, start_triton_emulator

from .conftest import spec, wait_for

pytestmark = pytest.mark.anyio

INFER = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [5] * 16},
    ]
}


def triton_runtime(name: str, triton: TritonEmulator) -> str:
    return f"""
[[runtimes]]
kind = "triton"
name = "{name}"
url = "{triton.http_url}"
poll_interval_s = 0.2
options = {{ metrics_url = "{triton.metrics_url}", grpc_url = "{triton.grpc_target}" }}
"""


@pytest.fixture(scope="module")
async def tritons() -> AsyncIterator[tuple[TritonEmulator, TritonEmulator]]:
    a = await start_triton_emulator()
    b = await start_triton_emulator()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@pytest.fixture(scope="module")
async def grpc_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
async def mesh(
    tritons: tuple[TritonEmulator, TritonEmulator], grpc_port: int
) -> AsyncIterator[LocalMesh]:
    a, b = tritons
    mesh_spec = spec(
        ReplicaSpec("h100", "llm"),
        extra_config=triton_runtime("triton-a", a) + triton_runtime("triton-b", b),
        env=(("INFERMESH_ROUTER__GRPC_LISTEN", f"127.0.0.1:{grpc_port}"),),
    )
    async with LocalMesh(mesh_spec) as running:
        async with httpx2.AsyncClient(base_url=running.router_url, timeout=10) as http:

            async def simple_ready() -> bool:
                return (await http.get("/v2/models/simple/ready")).status_code == 200

            await wait_for(simple_ready, "the router to route model 'simple' to a Triton")
        yield running


async def test_kserve_http_health_metadata_and_infer(
    mesh: LocalMesh, tritons: tuple[TritonEmulator, TritonEmulator]
) -> None:
    async with httpx2.AsyncClient(base_url=mesh.router_url, timeout=10) as http:
        assert (await http.get("/v2/health/live")).json() == {"live": True}
        assert (await http.get("/v2/health/ready")).status_code == 200
        metadata = (await http.get("/v2/models/simple")).json()
        assert [t["name"] for t in metadata["outputs"]] == ["OUTPUT0", "OUTPUT1"]
        for _ in range(4):
            response = await http.post("/v2/models/simple/infer", json=INFER)
            assert response.status_code == 200, response.text
            outputs = {out["name"]: out["data"] for out in response.json()["outputs"]}
            assert outputs["OUTPUT1"] == [i - 5 for i in range(16)]
        missing = await http.post("/v2/models/nope/infer", json=INFER)
        assert missing.status_code == 404
        assert "nope" in missing.json()["error"]
    served = sum(t.core.repository.stats_for("simple", "1").success for t in tritons)
    assert served >= 4


async def test_kserve_grpc_live_ready_and_infer(
    mesh: LocalMesh, tritons: tuple[TritonEmulator, TritonEmulator], grpc_port: int
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(kserve_pb2.ServerLiveRequest(), timeout=10)).live
        ready = await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="simple"), timeout=10)
        assert ready.ready
        request = kserve_pb2.ModelInferRequest(model_name="simple")
        for name in ("INPUT0", "INPUT1"):
            tensor = request.inputs.add()
            tensor.name, tensor.datatype = name, "INT32"
            tensor.shape.extend([1, 16])
        request.raw_input_contents.extend(
            [struct.pack("<16i", *range(16)), struct.pack("<16i", *[5] * 16)]
        )
        response = await stub.ModelInfer(request, timeout=10)
        assert struct.unpack("<16i", response.raw_output_contents[0]) == tuple(
            i + 5 for i in range(16)
        )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ModelInfer(kserve_pb2.ModelInferRequest(model_name="nope"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

"""KServe v2 inference passes the same admission gate as OpenAI requests: a refusal is a KServe
429 `{"error": ...}` with Retry-After over HTTP and RESOURCE_EXHAUSTED over gRPC, while
readiness and metadata calls are never refused by admission."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import grpc
import httpx2
import pytest

from infermesh.core.config import (
    AdmissionConfig,
    BatchAdmissionConfig,
    LatencyAdmissionConfig,
    SloAdmissionConfig,
)
from infermesh.core.model import RequestFeatures, SloClass
from infermesh.core.policy import PolicyKind, PolicySet, SetPolicy, TenantQuota
from infermesh.core.proto import kserve_pb2, kserve_pb2_grpc
from infermesh.dev.triton_emulator import TritonEmulator, start_triton_emulator
from infermesh.router.admission_gate import AdmissionGate
from infermesh.router.kserve import KServeIngress, KServeSettings
from infermesh.router.metrics import RouterMetrics
from infermesh.router.plugin import kserve_http_transport

from .kserve_support import StaticScoring, choice

pytestmark = pytest.mark.anyio

INFER = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
    ]
}


def one_slot_no_queue() -> AdmissionConfig:
    """One request per class in flight and no queue: a second one is refused at once."""
    return AdmissionConfig(
        latency=LatencyAdmissionConfig(1, 0, 1.0),
        standard=SloAdmissionConfig(1, 0, 1.0),
        batch=BatchAdmissionConfig(1, 0, 1.0),
    )


class Rig:
    def __init__(self, triton: TritonEmulator, gate: AdmissionGate, ingress: KServeIngress):
        self.triton = triton
        self.gate = gate
        self.ingress = ingress
        self.policy = PolicySet()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    from infermesh.core.contracts import TransportContext

    triton = await start_triton_emulator()
    scoring = StaticScoring(routes={"simple": [choice(triton.http_url, "simple")]})
    metrics = RouterMetrics()
    holder: list[Rig] = []
    gate = AdmissionGate(one_slot_no_queue(), metrics, policy=lambda: holder[0].policy)
    transport = kserve_http_transport(TransportContext(connect_timeout_s=2, read_timeout_s=30))
    ingress = KServeIngress(
        scoring,
        lambda name: transport,
        lambda outcome: None,
        metrics,
        KServeSettings(
            grpc_listen="127.0.0.1:0", grpc_targets={triton.http_url: triton.grpc_target}
        ),
        admit=gate.admit,
    )
    running = Rig(triton, gate, ingress)
    holder.append(running)
    await ingress.start()
    try:
        yield running
    finally:
        await ingress.aclose()
        await transport.aclose()
        await triton.aclose()


@pytest.fixture
async def http(rig: Rig) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=rig.ingress)
    async with httpx2.AsyncClient(transport=transport, base_url="http://router") as client:
        yield client


@pytest.fixture
async def stub(rig: Rig) -> AsyncIterator[kserve_pb2_grpc.GRPCInferenceServiceStub]:
    assert rig.ingress.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.ingress.grpc.port}") as channel:
        yield kserve_pb2_grpc.GRPCInferenceServiceStub(channel)


def infer_request() -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "INT32"
        tensor.shape.extend([1, 16])
    request.raw_input_contents.extend(
        [struct.pack("<16i", *range(16)), struct.pack("<16i", *[3] * 16)]
    )
    return request


def busy(slo: SloClass = SloClass.STANDARD) -> RequestFeatures:
    """Another request of the same model and class, holding the class's only slot."""
    return RequestFeatures("simple", slo_class=slo, request_id="holder")


async def test_http_infer_is_refused_with_a_kserve_429_while_the_class_is_full(
    rig: Rig, http: httpx2.AsyncClient
) -> None:
    async with rig.gate.admit(busy()):
        refused = await http.post("/v2/models/simple/infer", json=INFER)
        assert refused.status_code == 429
        assert set(refused.json()) == {"error"}
        assert "standard" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        # Readiness and metadata are not inference: admission never refuses them.
        assert (await http.get("/v2/models/simple/ready")).status_code == 200
        assert (await http.get("/v2/models/simple")).status_code == 200
        # Another class has its own slot.
        other = await http.post(
            "/v2/models/simple/infer", json=INFER, headers={"x-infermesh-slo": "latency"}
        )
        assert other.status_code == 200, other.text
    assert rig.triton.core.repository.stats_for("simple", "1").success == 1
    answered = await http.post("/v2/models/simple/infer", json=INFER)
    assert answered.status_code == 200, answered.text
    assert rig.triton.core.repository.stats_for("simple", "1").success == 2


async def test_grpc_infer_is_refused_with_resource_exhausted_while_the_class_is_full(
    rig: Rig, stub: kserve_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    async with rig.gate.admit(busy()):
        call = stub.ModelInfer(infer_request(), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "standard" in (refused.value.details() or "")
        trailers = dict(await call.trailing_metadata() or ())
        assert int(str(trailers["retry-after"])) >= 1
        assert int(str(trailers["grpc-retry-pushback-ms"])) > 0
        ready = await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="simple"), timeout=10)
        assert ready.ready
    response = await stub.ModelInfer(infer_request(), timeout=10)
    assert struct.unpack("<16i", response.raw_output_contents[0]) == tuple(i + 3 for i in range(16))


async def test_a_tenant_over_its_quota_gets_a_429_on_both_protocols(
    rig: Rig, http: httpx2.AsyncClient, stub: kserve_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    rig.policy = rig.policy.apply(
        SetPolicy(PolicyKind.QUOTAS, "acme", TenantQuota(requests_per_s=1))
    )
    tenant = {"x-infermesh-tenant": "acme"}
    first = await http.post("/v2/models/simple/infer", json=INFER, headers=tenant)
    assert first.status_code == 200, first.text
    second = await http.post("/v2/models/simple/infer", json=INFER, headers=tenant)
    assert second.status_code == 429
    assert "acme" in second.json()["error"]
    assert "retry-after" in second.headers
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ModelInfer(
            infer_request(), timeout=10, metadata=(("x-infermesh-tenant", "acme"),)
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = await http.post(
        "/v2/models/simple/infer", json=INFER, headers={"x-infermesh-tenant": "someone-else"}
    )
    assert other.status_code == 200

"""KServe v2 gRPC ingress: GRPCInferenceService in front of emulated Tritons, with grpcio stubs."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from infermesh.core.proto import kserve_pb2, kserve_pb2_grpc
from infermesh.dev.triton_server import TritonEmulatorConfig
from infermesh.router.kserve_wire import MalformedMessage, model_of

from .conftest import wait_until
from .kserve_support import KServeRig, choice, closed_port, kserve_rig

pytestmark = pytest.mark.anyio


def infer_request(model: str = "simple") -> kserve_pb2.ModelInferRequest:
    request = kserve_pb2.ModelInferRequest(model_name=model, id="call-1")
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add()
        tensor.name, tensor.datatype = name, "INT32"
        tensor.shape.extend([1, 16])
    request.raw_input_contents.append(struct.pack("<16i", *range(16)))
    request.raw_input_contents.append(struct.pack("<16i", *[3] * 16))
    return request


@pytest.fixture
async def rig() -> AsyncIterator[KServeRig]:
    # One execution at a time, so a second request waits in the emulator's queue.
    async with kserve_rig("127.0.0.1:0", TritonEmulatorConfig(instance_count=1)) as running:
        yield running


@pytest.fixture
async def channel(rig: KServeRig) -> AsyncIterator[grpc.aio.Channel]:
    assert rig.ingress.grpc is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{rig.ingress.grpc.port}") as open_channel:
        yield open_channel


def test_model_name_is_read_from_the_wire_without_decoding_tensors() -> None:
    request = infer_request()
    request.model_version = "2"
    assert model_of(request.SerializeToString()) == ("simple", "2")
    assert model_of(kserve_pb2.ModelReadyRequest(name="m").SerializeToString()) == ("m", "")
    assert model_of(b"") == ("", "")
    for garbage in (b"\x0a\x05ab", b"\xff", b"\x0f"):
        with pytest.raises(MalformedMessage):
            model_of(garbage)


async def test_router_answers_server_live_ready_metadata_health_and_reflection(
    rig: KServeRig, channel: grpc.aio.Channel
) -> None:
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert (await stub.ServerLive(kserve_pb2.ServerLiveRequest())).live
    assert (await stub.ServerReady(kserve_pb2.ServerReadyRequest())).ready
    metadata = await stub.ServerMetadata(kserve_pb2.ServerMetadataRequest())
    assert metadata.name == "infermesh-router"
    rig.scoring.serving = False
    assert not (await stub.ServerReady(kserve_pb2.ServerReadyRequest())).ready

    health = health_pb2_grpc.HealthStub(channel)
    checked = await health.Check(
        health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
    )
    assert checked.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = [s.name async for reply in listing for s in reply.list_services_response.service]
    assert "inference.GRPCInferenceService" in services


async def test_model_calls_are_forwarded_to_the_chosen_triton(
    rig: KServeRig, channel: grpc.aio.Channel
) -> None:
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    assert (await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="simple"))).ready
    metadata = await stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name="simple"))
    assert [t.name for t in metadata.inputs] == ["INPUT0", "INPUT1"]

    call = stub.ModelInfer(infer_request(), metadata=(("x-request-id", "grpc-7"),))
    response = await call
    sums = struct.unpack("<16i", response.raw_output_contents[0])
    assert sums == tuple(i + 3 for i in range(16))
    assert response.id == "call-1"
    assert ("x-request-id", "grpc-7") in tuple(await call.trailing_metadata())
    infer_outcome = rig.scoring.outcomes[-1]
    assert infer_outcome.ok
    assert infer_outcome.request_id == "grpc-7"
    assert infer_outcome.target_id == choice(rig.a.http_url, "simple").target_id


async def test_unreachable_triton_is_skipped_for_the_next(
    rig: KServeRig, channel: grpc.aio.Channel
) -> None:
    dead = f"http://127.0.0.1:{closed_port()}"
    rig.ingress.grpc.grpc_targets[dead] = f"127.0.0.1:{closed_port()}"  # type: ignore[union-attr]
    rig.route("simple", dead, rig.b)
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    response = await stub.ModelInfer(infer_request(), timeout=10)
    assert len(response.raw_output_contents) == 2
    failed, answered = rig.scoring.outcomes
    assert not failed.ok
    assert "UNAVAILABLE" in failed.error
    assert answered.target_id == choice(rig.b.http_url, "simple").target_id


async def test_router_refusals_carry_grpc_codes(rig: KServeRig, channel: grpc.aio.Channel) -> None:
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.ModelInfer(infer_request("nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as nameless:
        await stub.ModelReady(kserve_pb2.ModelReadyRequest())
    assert nameless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    rig.scoring.routes["stale"] = []
    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="stale"))
    assert stale.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy target" in (stale.value.details() or "")
    # Triton's own refusal (a wrong input) reaches the caller unchanged.
    bad = infer_request()
    del bad.raw_input_contents[1]
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.ModelInfer(bad)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deadline_and_cancellation_reach_the_triton(
    rig: KServeRig, channel: grpc.aio.Channel
) -> None:
    rig.a.core.slowdown = 2000.0  # an execution takes seconds
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    stats = rig.a.core.repository.stats_for("simple", "1")
    busy = stub.ModelInfer(infer_request())  # holds the one instance
    await wait_until(lambda: stats.executing == 1, "the first request executing in Triton")
    cancelled_before = stats.failure["CANCELED"]

    async def pending(count: int) -> None:
        await wait_until(lambda: stats.pending == count, f"{count} request(s) pending in Triton")

    async def cancelled(count: int) -> None:
        await wait_until(
            lambda: stats.failure["CANCELED"] == cancelled_before + count,
            f"{count} request(s) counted CANCELED by Triton",
        )

    # Queued behind the busy one, the request's deadline passes: the client gets
    # DEADLINE_EXCEEDED and Triton drops it from its queue, counted as cancelled.
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.ModelInfer(infer_request(), timeout=1.0)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await cancelled(1)
    await pending(0)

    waiting = stub.ModelInfer(infer_request())
    await pending(1)
    waiting.cancel()
    await pending(0)
    await cancelled(2)
    busy.cancel()


async def test_a_target_without_grpc_url_is_reached_through_its_kserve_grpc_label(
    rig: KServeRig, channel: grpc.aio.Channel
) -> None:
    ingress = rig.ingress.grpc
    assert ingress is not None
    ingress.grpc_targets.clear()
    stub = kserve_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="simple"))
    assert "options.grpc_url" in (unknown.value.details() or "")
    labels = {choice(rig.b.http_url, "simple").target_id: rig.b.grpc_target}
    ingress.label_of = lambda target_id: labels.get(target_id, "")
    assert (await stub.ModelReady(kserve_pb2.ModelReadyRequest(name="simple"))).ready

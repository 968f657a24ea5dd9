"""Admission in the running router: 429 over HTTP, and the slot freed however a request ends."""

from __future__ import annotations

import pytest

from infermesh.core.config import (
    AdmissionConfig,
    BatchAdmissionConfig,
    LatencyAdmissionConfig,
    SloAdmissionConfig,
)
from infermesh.core.model import SloClass
from infermesh.router.admission_gate import AdmissionGate
from infermesh.router.metrics import RouterMetrics

from .conftest import Mesh, wait_until

pytestmark = pytest.mark.anyio


def one_slot_per_class(mesh: Mesh) -> AdmissionGate:
    """Give the router one slot per class and no queue."""
    config = AdmissionConfig(
        latency=LatencyAdmissionConfig(max_concurrent=1, max_queue=0),
        standard=SloAdmissionConfig(max_concurrent=1, max_queue=0),
        batch=BatchAdmissionConfig(max_concurrent=1, max_queue=0),
    )
    gate = AdmissionGate.for_scoring(config, RouterMetrics(), mesh.app.scoring)
    mesh.app.admission = gate
    return gate


def in_flight(gate: AdmissionGate) -> int:
    return gate.queues.in_flight("m", SloClass.STANDARD)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_a_request_beyond_its_class_limit_gets_429_overloaded_with_retry_after(
    mesh: Mesh,
) -> None:
    await mesh.route("m", [mesh.a.endpoint])
    gate = one_slot_per_class(mesh)
    mesh.a.release_rest.clear()
    stream = await mesh.openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hold"}], stream=True
    )
    chunks = aiter(stream)
    await anext(chunks)  # the stream holds the only standard slot

    refused = await mesh.http.post(
        "/v1/chat/completions", json=CHAT, headers={"x-request-id": "rid-429"}
    )
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-request-id"] == "rid-429"
    error = refused.json()["error"]
    assert error["code"] == "overloaded"
    assert "'m'" in error["message"]
    # Another class has its own slot.
    other = await mesh.http.post(
        "/v1/chat/completions", json=CHAT, headers={"x-infermesh-slo": "batch"}
    )
    assert other.status_code == 200

    mesh.a.release_rest.set()
    async for _ in chunks:
        pass
    await wait_until(lambda: in_flight(gate) == 0, "the stream's slot to be freed")
    again = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 200


async def test_a_client_that_leaves_mid_stream_frees_its_slot(mesh: Mesh) -> None:
    await mesh.route("m", [mesh.a.endpoint])
    gate = one_slot_per_class(mesh)
    mesh.a.release_rest.clear()
    try:
        stream = await mesh.openai.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hold"}], stream=True
        )
        await anext(aiter(stream))
        assert in_flight(gate) == 1
        await stream.close()
        await wait_until(lambda: in_flight(gate) == 0, "the slot of the departed client")
    finally:
        mesh.a.release_rest.set()


async def test_a_failed_request_frees_its_slot(mesh: Mesh) -> None:
    await mesh.route("m", [mesh.a.endpoint])
    gate = one_slot_per_class(mesh)
    mesh.a.mode = "error500"
    failed = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert failed.status_code == 502
    assert in_flight(gate) == 0
    mesh.a.mode = "ok"
    assert (await mesh.http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_saturated_replicas_shed_batch_but_not_latency_in_both_scoring_modes(
    mesh: Mesh,
) -> None:
    await mesh.route("m", [mesh.a.endpoint])
    gate = AdmissionGate.for_scoring(AdmissionConfig(), RouterMetrics(), mesh.app.scoring)
    mesh.app.admission = gate
    gate.start()  # agent mode: polls the agent's model states
    try:
        await mesh.publish(mesh.agent.state_of("m", mesh.a.endpoint, waiting=100.0))

        def sees_queue() -> bool:
            fleet = gate.fleet("m") if gate.fleet is not None else None
            return any(state.waiting == 100.0 for state in fleet or ())

        await wait_until(sees_queue, "admission to see the replica's queue")
        shed = await mesh.http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-infermesh-slo": "batch"}
        )
        assert shed.status_code == 429
        assert shed.json()["error"]["code"] == "overloaded"
        assert "saturated" in shed.json()["error"]["message"]
        latency = await mesh.http.post(
            "/v1/chat/completions", json=CHAT, headers={"x-infermesh-slo": "latency"}
        )
        assert latency.status_code == 200
    finally:
        await gate.aclose()

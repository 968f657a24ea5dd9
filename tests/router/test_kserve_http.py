"""KServe v2 HTTP ingress: the router's own /v2 answers, calls forwarded to emulated Tritons."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import httpx2
import orjson
import pytest

from infermesh.router.kserve_http import KServeCall, parse_kserve_path

from .kserve_support import MAX_BODY_BYTES, KServeRig, choice, closed_port, kserve_rig

pytestmark = pytest.mark.anyio

INFER = {
    "inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": list(range(16))},
        {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
    ]
}


@pytest.fixture
async def rig() -> AsyncIterator[KServeRig]:
    async with kserve_rig() as running:
        yield running


@pytest.fixture
async def client(rig: KServeRig) -> AsyncIterator[httpx2.AsyncClient]:
    transport = httpx2.ASGITransport(app=rig.ingress)
    async with httpx2.AsyncClient(transport=transport, base_url="http://router") as http:
        yield http


def test_paths_name_the_kserve_calls() -> None:
    assert parse_kserve_path("/v2") == KServeCall("server_metadata", "GET")
    assert parse_kserve_path("/v2/health/ready") == KServeCall("ready", "GET")
    assert parse_kserve_path("/v2/models/m") == KServeCall("model_metadata", "GET", "m")
    assert parse_kserve_path("/v2/models/m/versions/3/infer") == KServeCall(
        "infer", "POST", "m", "3"
    )
    assert parse_kserve_path("/v2/models/m/ready") == KServeCall("model_ready", "GET", "m")
    for path in ("/v2/models", "/v2/models/m/explain", "/v2/repository/index", "/v2/models/m/a/b"):
        assert parse_kserve_path(path) is None


async def test_router_answers_live_ready_and_server_metadata(
    rig: KServeRig, client: httpx2.AsyncClient
) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    metadata = (await client.get("/v2")).json()
    assert metadata["name"] == "infermesh-router"

    rig.scoring.serving = False
    not_ready = await client.get("/v2/health/ready")
    assert not_ready.status_code == 400
    assert "unreachable" in not_ready.json()["error"]


async def test_metadata_and_readiness_come_from_the_chosen_triton(
    client: httpx2.AsyncClient,
) -> None:
    metadata = await client.get("/v2/models/simple")
    assert metadata.status_code == 200
    assert metadata.json()["name"] == "simple"
    assert [t["name"] for t in metadata.json()["inputs"]] == ["INPUT0", "INPUT1"]
    assert (await client.get("/v2/models/simple/versions/1")).json()["name"] == "simple"
    assert (await client.get("/v2/models/simple/ready")).status_code == 200


async def test_json_infer_is_forwarded_and_reported(
    rig: KServeRig, client: httpx2.AsyncClient
) -> None:
    response = await client.post(
        "/v2/models/simple/infer", json=INFER, headers={"x-request-id": "req-7"}
    )
    assert response.status_code == 200, response.text
    outputs = {out["name"]: out["data"] for out in response.json()["outputs"]}
    assert outputs["OUTPUT0"] == [i + 1 for i in range(16)]
    assert response.headers["x-request-id"] == "req-7"
    [outcome] = rig.scoring.outcomes
    assert outcome.ok
    assert outcome.status == 200
    assert outcome.request_id == "req-7"
    assert outcome.target_id == choice(rig.a.http_url, "simple").target_id


async def test_binary_tensors_pass_through_untouched(client: httpx2.AsyncClient) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": f"INPUT{i}",
                    "shape": [1, 16],
                    "datatype": "INT32",
                    "parameters": {"binary_data_size": 64},
                }
                for i in (0, 1)
            ],
            "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
        }
    )
    body = header + struct.pack("<16i", *range(16)) + struct.pack("<16i", *[2] * 16)
    response = await client.post(
        "/v2/models/simple/infer",
        content=body,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )
    assert response.status_code == 200, response.text
    json_length = int(response.headers["inference-header-content-length"])
    assert struct.unpack("<16i", response.content[json_length:]) == tuple(i + 2 for i in range(16))


async def test_unreachable_triton_is_skipped_for_the_next(
    rig: KServeRig, client: httpx2.AsyncClient
) -> None:
    rig.route("simple", f"http://127.0.0.1:{closed_port()}", rig.b)
    response = await client.post("/v2/models/simple/infer", json=INFER)
    assert response.status_code == 200
    failed, answered = rig.scoring.outcomes
    assert not failed.ok
    assert "Triton at" in failed.error
    assert answered.ok
    assert answered.target_id == choice(rig.b.http_url, "simple").target_id


async def test_triton_errors_reach_the_client_as_triton_sent_them(
    client: httpx2.AsyncClient,
) -> None:
    bad = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1]}]}
    response = await client.post("/v2/models/simple/infer", json=bad)
    assert response.status_code == 400
    assert "error" in response.json()


async def test_router_errors_use_kserve_error_shape(
    rig: KServeRig, client: httpx2.AsyncClient
) -> None:
    unknown = await client.post("/v2/models/nope/infer", json=INFER)
    assert unknown.status_code == 404
    assert "'nope' is not served" in unknown.json()["error"]

    rig.scoring.routes["stale"] = []
    unavailable = await client.get("/v2/models/stale/ready")
    assert unavailable.status_code == 503
    assert unavailable.headers["retry-after"] == "3"
    assert "no healthy target" in unavailable.json()["error"]

    wrong_method = await client.get("/v2/models/simple/infer")
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert "use POST" in wrong_method.json()["error"]

    assert (await client.get("/v2/repository/index")).status_code == 404

    too_big = await client.post("/v2/models/simple/infer", content=b"x" * (MAX_BODY_BYTES + 1))
    assert too_big.status_code == 413
    assert "router.max_body_bytes" in too_big.json()["error"]

    dead = f"http://127.0.0.1:{closed_port()}"
    rig.route("simple", dead, dead)
    failed = await client.post("/v2/models/simple/infer", json=INFER)
    assert failed.status_code == 502
    assert "no Triton target answered" in failed.json()["error"]


async def test_models_of_non_kserve_runtimes_are_not_sent_kserve_calls(
    rig: KServeRig, client: httpx2.AsyncClient
) -> None:
    rig.scoring.routes["llama"] = [choice(rig.a.http_url, "llama", "openai-http")]
    response = await client.get("/v2/models/llama")
    assert response.status_code == 404
    assert "transport = 'kserve-http'" in response.json()["error"]
    [released] = rig.scoring.outcomes
    assert released.reservation_id

"""A Triton model loaded and unloaded through the Triton adapter's RuntimeControl appears in and
disappears from the router's /v1/models and KServe routes (real agent and router processes, an
emulated Triton watched as `kind = "triton"`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest

from infermesh.core.contracts import AdapterContext
from infermesh.dev.harness import LocalMesh, ReplicaSpec
from infermesh.dev.triton_emulator import (
    TritonEmulator,
    TritonEmulatorConfig,
    start_triton_emulator,
)
from infermesh.triton.adapter import TritonAdapter

from .conftest import spec, wait_for

pytestmark = pytest.mark.anyio

IDENTITY_INFER = {
    "inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1.5, 2.5, 3.5]}]
}


@pytest.fixture(scope="module")
async def triton() -> AsyncIterator[TritonEmulator]:
    emulator = await start_triton_emulator(TritonEmulatorConfig(models=("simple",)))
    try:
        yield emulator
    finally:
        await emulator.aclose()


@pytest.fixture(scope="module")
async def mesh(triton: TritonEmulator) -> AsyncIterator[LocalMesh]:
    runtime = f"""
[[runtimes]]
kind = "triton"
name = "triton-a"
url = "{triton.http_url}"
poll_interval_s = 0.2
options = {{ metrics_url = "{triton.metrics_url}" }}
"""
    async with LocalMesh(spec(ReplicaSpec("instant", "llm"), extra_config=runtime)) as running:
        yield running


async def test_a_model_loaded_and_unloaded_through_runtime_control_follows_in_the_router(
    mesh: LocalMesh, triton: TritonEmulator
) -> None:
    control = TritonAdapter(
        AdapterContext(
            node="n1", name="ops", url=triton.http_url, options={"metrics_url": triton.metrics_url}
        )
    )
    async with httpx2.AsyncClient(base_url=mesh.router_url, timeout=10) as http:

        async def listed() -> set[str]:
            response = await http.get("/v1/models")
            return {entry["id"] for entry in response.json()["data"]}

        async def ready(model: str) -> bool:
            return (await http.get(f"/v2/models/{model}/ready")).status_code == 200

        async def simple_ready() -> bool:
            return await ready("simple")

        await wait_for(simple_ready, "model 'simple' ready through the router")
        assert "identity_fp32" not in await listed()
        assert not await ready("identity_fp32")

        try:
            await control.load("identity_fp32", "repository")

            async def appeared() -> bool:
                return "identity_fp32" in await listed() and await ready("identity_fp32")

            await wait_for(appeared, "identity_fp32 in /v1/models and ready on the KServe route")
            answer = await http.post("/v2/models/identity_fp32/infer", json=IDENTITY_INFER)
            assert answer.status_code == 200
            assert answer.json()["outputs"][0]["data"] == [1.5, 2.5, 3.5]

            await control.unload("identity_fp32")

            async def disappeared() -> bool:
                return "identity_fp32" not in await listed() and not await ready("identity_fp32")

            await wait_for(disappeared, "identity_fp32 gone from /v1/models and the KServe route")
            refused = await http.post("/v2/models/identity_fp32/infer", json=IDENTITY_INFER)
            assert refused.status_code >= 400
            assert "error" in refused.json()
        finally:
            await control.aclose()

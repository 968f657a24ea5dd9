"""The Triton emulator over real sockets: Triton's own HTTP client, gRPC stubs, the metrics page."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.http.aio as triton_http
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from infermesh.core.proto import kserve_pb2 as pb
from infermesh.core.proto import kserve_pb2_grpc as pb_grpc
from infermesh.dev.cli import dev_group
from infermesh.dev.harness import free_port, infermesh_command
from infermesh.dev.profiles import GpuProfile, get_profile
from infermesh.dev.triton_emulator import (
    TritonEmulator,
    TritonEmulatorConfig,
    start_triton_emulator,
)

pytestmark = pytest.mark.anyio

FAST = GpuProfile(
    name="h100",  # the card's memory and power; steps short enough that tests do not wait
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.001,
    step_per_seq_s=0.0,
    num_gpu_blocks=1024,
    max_model_len=2048,
)
StartTriton = Callable[..., Awaitable[TritonEmulator]]


@pytest.fixture
async def start() -> AsyncIterator[StartTriton]:
    emulators: list[TritonEmulator] = []

    async def _start(**options: object) -> TritonEmulator:
        options.setdefault("profile", FAST)
        options.setdefault("load_s", 0.0)
        emulator = await start_triton_emulator(TritonEmulatorConfig(**options))  # type: ignore[arg-type]
        emulators.append(emulator)
        return emulator

    yield _start
    for emulator in emulators:
        await emulator.aclose()


@pytest.fixture
async def triton(start: StartTriton) -> TritonEmulator:
    return await start()


@pytest.fixture
async def client(triton: TritonEmulator) -> AsyncIterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    yield client
    await client.close()


def simple_inputs(
    a: np.ndarray, b: np.ndarray, datatype: str = "INT32", binary: bool = True
) -> list[triton_http.InferInput]:
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = triton_http.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=binary)
        inputs.append(tensor)
    return inputs


async def metrics(triton: TritonEmulator) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The metrics page as {name: {sorted labels: value}}, through prometheus' own parser
    (which reports counters as `<name>_total`; Triton's page has no such suffix)."""
    async with aiohttp.ClientSession() as session, session.get(triton.metrics_url) as response:
        assert response.status == 200
        text = await response.text()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(sample.name.removesuffix("_total"), {})[labels] = sample.value
    return out


def series(
    page: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str
) -> float:
    matches = [
        value
        for key, value in page.get(name, {}).items()
        if all((k, v) in key for k, v in labels.items())
    ]
    assert len(matches) == 1, f"{name}{labels}: {page.get(name)}"
    return matches[0]


# --------------------------------------------------------------------------- HTTP, Triton's client


async def test_health_and_metadata_answer_like_triton(
    client: triton_http.InferenceServerClient,
) -> None:
    assert await client.is_server_live()
    assert await client.is_server_ready()
    assert await client.is_model_ready("simple")
    assert await client.is_model_ready("simple", "1")
    assert not await client.is_model_ready("simple", "7")
    server = await client.get_server_metadata()
    assert server["name"] == "triton"
    assert "model_repository" in server["extensions"]
    model = await client.get_model_metadata("simple")
    assert model["versions"] == ["1"]
    assert [t["name"] for t in model["inputs"]] == ["INPUT0", "INPUT1"]
    assert model["inputs"][0] == {"name": "INPUT0", "datatype": "INT32", "shape": [-1, 16]}
    config = await client.get_model_config("simple")
    assert config["max_batch_size"] == 8


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
async def test_simple_model_adds_and_subtracts(
    client: triton_http.InferenceServerClient, binary: bool
) -> None:
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 3, dtype=np.int32)
    outputs = [
        triton_http.InferRequestedOutput("OUTPUT0", binary_data=binary),
        triton_http.InferRequestedOutput("OUTPUT1", binary_data=binary),
    ]
    result = await client.infer(
        "simple", simple_inputs(a, b, binary=binary), outputs=outputs, request_id="r-1"
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    response = result.get_response()
    assert response["model_name"] == "simple"
    assert response["model_version"] == "1"
    assert response["id"] == "r-1"


async def test_simple_string_model_works_on_decimal_strings(
    client: triton_http.InferenceServerClient,
) -> None:
    a = np.array([[str(i) for i in range(16)]], dtype=object)
    b = np.array([["10"] * 16], dtype=object)
    result = await client.infer("simple_string", simple_inputs(a, b, "BYTES"))
    assert [v.decode() for v in result.as_numpy("OUTPUT0")[0]] == [str(i + 10) for i in range(16)]
    assert [v.decode() for v in result.as_numpy("OUTPUT1")[0]] == [str(i - 10) for i in range(16)]


async def test_only_the_requested_outputs_come_back(
    client: triton_http.InferenceServerClient,
) -> None:
    data = np.ones((1, 16), dtype=np.int32)
    result = await client.infer(
        "simple",
        simple_inputs(data, data),
        outputs=[triton_http.InferRequestedOutput("OUTPUT1", binary_data=False)],
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["OUTPUT1"]


async def test_refusals_are_triton_json_errors_with_kserve_statuses(
    triton: TritonEmulator,
) -> None:
    url = triton.http_url
    async with aiohttp.ClientSession() as session:

        async def post(path: str, body: object) -> tuple[int, object]:
            async with session.post(url + path, json=body) as response:
                return response.status, await response.json()

        wrong_type = {
            "inputs": [
                {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16},
                {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
            ]
        }
        status, body = await post("/v2/models/simple/infer", wrong_type)
        assert status == 400
        assert body == {
            "error": "inference input 'INPUT0' data-type is 'FP32', but model 'simple' "
            "expects 'INT32'"
        }
        short = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1]}]}
        status, body = await post("/v2/models/simple/infer", short)
        assert status == 400
        assert "unexpected number of elements 1 for shape [1, 16]" in str(body)
        status, body = await post("/v2/models/nope/infer", wrong_type)
        assert (status, body) == (404, {"error": "Request for unknown model: 'nope' is not found"})
        async with session.post(url + "/v2/models/simple/infer", data=b"{not json") as response:
            assert response.status == 400
            assert "failed to parse the request JSON buffer" in (await response.json())["error"]
    page = await metrics(triton)
    assert series(page, "nv_inference_request_failure", model="simple", reason="OTHER") == 3


async def test_unload_and_load_change_readiness_index_and_metrics(
    triton: TritonEmulator, client: triton_http.InferenceServerClient
) -> None:
    data = np.ones((1, 16), dtype=np.int32)
    await client.infer("simple", simple_inputs(data, data))
    await client.unload_model("simple")
    assert not await client.is_model_ready("simple")
    index = {row["name"]: row for row in await client.get_model_repository_index()}
    assert index["simple"] == {
        "name": "simple",
        "version": "1",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    }
    assert index["simple_string"]["state"] == "READY"
    with pytest.raises(InferenceServerException, match="has no available versions") as refused:
        await client.infer("simple", simple_inputs(data, data))
    assert refused.value.status() == "503"
    page = await metrics(triton)
    assert not any(("model", "simple") in key for key in page["nv_inference_count"])

    await client.load_model("simple")
    assert await client.is_model_ready("simple")
    page = await metrics(triton)
    assert series(page, "nv_inference_count", model="simple") == 0  # counters restart at load
    ready_only = await client.get_model_repository_index()
    assert all(row["state"] == "READY" for row in ready_only)


async def test_models_not_loaded_at_start_are_listed_by_name_only(start: StartTriton) -> None:
    triton = await start(models=("simple",))
    async with aiohttp.ClientSession() as session:
        async with session.post(triton.http_url + "/v2/repository/index") as response:
            rows = await response.json()
        async with session.post(
            triton.http_url + "/v2/repository/index", json={"ready": True}
        ) as response:
            ready_rows = await response.json()
    assert {"name": "simple_string"} in rows
    assert [row["name"] for row in ready_rows] == ["simple"]


async def test_load_of_an_unknown_model_and_control_mode_none_are_refused(
    start: StartTriton,
) -> None:
    explicit = await start()
    fixed = await start(explicit=False)
    async with aiohttp.ClientSession() as session:
        path = "/v2/repository/models/{}/load"
        async with session.post(explicit.http_url + path.format("nope")) as response:
            assert response.status == 400
            assert "failed to load 'nope'" in (await response.json())["error"]
        bad_config = {"parameters": {"config": "{not json"}}
        async with session.post(
            explicit.http_url + path.format("simple"), json=bad_config
        ) as response:
            assert response.status == 400
            assert "parameter 'config' must be" in (await response.json())["error"]
        good_config = {"parameters": {"config": '{"max_batch_size": 8}'}}
        async with session.post(
            explicit.http_url + path.format("simple"), json=good_config
        ) as response:
            assert response.status == 200
        async with session.post(fixed.http_url + path.format("simple")) as response:
            assert response.status == 503
            assert "--model-control-mode=explicit" in (await response.json())["error"]


async def test_server_not_ready_answers_400_on_ready(triton: TritonEmulator) -> None:
    triton.core.ready = False
    async with aiohttp.ClientSession() as session:
        async with session.get(triton.http_url + "/v2/health/ready") as response:
            assert response.status == 400
        async with session.get(triton.http_url + "/v2/health/live") as response:
            assert response.status == 200


# --------------------------------------------------------------------------- metrics


async def test_metrics_use_tritons_names_units_and_labels(
    triton: TritonEmulator, client: triton_http.InferenceServerClient
) -> None:
    data = np.ones((4, 16), dtype=np.int32)
    for _ in range(3):
        await client.infer("simple", simple_inputs(data, data))
    page = await metrics(triton)
    labels = {"model": "simple", "version": "1"}
    assert series(page, "nv_inference_request_success", **labels) == 3
    assert series(page, "nv_inference_count", **labels) == 12  # a batch of 4 counts 4
    assert series(page, "nv_inference_exec_count", **labels) == 3
    request_us = series(page, "nv_inference_request_duration_us", **labels)
    infer_us = series(page, "nv_inference_compute_infer_duration_us", **labels)
    assert infer_us >= 3 * 1000  # three executions of at least the profile's 1 ms, in µs
    assert request_us >= infer_us + series(page, "nv_inference_queue_duration_us", **labels)
    assert series(page, "nv_inference_pending_request_count", **labels) == 0
    gpu = triton.core.config.gpu_id()
    assert gpu.startswith("GPU-")
    assert series(page, "nv_gpu_memory_total_bytes", gpu_uuid=gpu) == 80 * 1024**3
    used = series(page, "nv_gpu_memory_used_bytes", gpu_uuid=gpu)
    assert 0 < used < 80 * 1024**3
    assert 0.0 <= series(page, "nv_gpu_utilization", gpu_uuid=gpu) <= 1.0
    assert series(page, "nv_gpu_power_limit", gpu_uuid=gpu) == 700
    # Per-model series carry the GPU the model runs on.
    assert ("gpu_uuid", gpu) in next(iter(page["nv_inference_count"]))


async def test_a_cpu_only_server_has_no_gpu_series(start: StartTriton) -> None:
    triton = await start(profile=get_profile("instant"))
    page = await metrics(triton)
    assert "nv_inference_count" in page
    assert not [name for name in page if name.startswith("nv_gpu_")]


async def test_requests_beyond_the_instances_wait_and_show_as_pending(
    start: StartTriton,
) -> None:
    slow = GpuProfile(
        name="a10",
        gpu_name="test",
        prefill_tokens_per_s=1_000_000.0,
        step_base_s=0.2,
        step_per_seq_s=0.0,
        num_gpu_blocks=1024,
        max_model_len=2048,
    )
    triton = await start(profile=slow)
    client = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    data = np.ones((1, 16), dtype=np.int32)
    try:
        calls = [
            asyncio.ensure_future(client.infer("simple", simple_inputs(data, data)))
            for _ in range(4)
        ]
        deadline = time.monotonic() + 10
        pending = 0.0
        while pending < 1:
            assert time.monotonic() < deadline, "no request ever showed as pending"
            page = await metrics(triton)
            pending = series(page, "nv_inference_pending_request_count", model="simple")
        await asyncio.gather(*calls)
        page = await metrics(triton)
        assert series(page, "nv_inference_pending_request_count", model="simple") == 0
        assert series(page, "nv_inference_queue_duration_us", model="simple") > 0
        assert series(page, "nv_inference_exec_count", model="simple") == 4
    finally:
        await client.close()


# --------------------------------------------------------------------------- gRPC


async def test_grpc_service_speaks_kserve_v2(triton: TritonEmulator) -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    async with grpc.aio.insecure_channel(triton.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="simple"))).ready
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name="simple"))
        assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
        assert list(metadata.inputs[0].shape) == [-1, 16]

        def tensor(name: str) -> pb.ModelInferRequest.InferInputTensor:
            return pb.ModelInferRequest.InferInputTensor(name=name, datatype="INT32", shape=[1, 16])

        raw = pb.ModelInferRequest(
            model_name="simple",
            id="g-1",
            inputs=[tensor("INPUT0"), tensor("INPUT1")],
            raw_input_contents=[a.tobytes(), b.tobytes()],
        )
        answer = await stub.ModelInfer(raw)
        assert (answer.model_name, answer.model_version, answer.id) == ("simple", "1", "g-1")
        total = np.frombuffer(answer.raw_output_contents[0], dtype="<i4")
        np.testing.assert_array_equal(total, (a + b).ravel())

        typed = pb.ModelInferRequest(
            model_name="simple", inputs=[tensor("INPUT0"), tensor("INPUT1")]
        )
        typed.inputs[0].contents.int_contents.extend(a.ravel().tolist())
        typed.inputs[1].contents.int_contents.extend(b.ravel().tolist())
        typed.outputs.add(name="OUTPUT1")
        answer = await stub.ModelInfer(typed)
        assert [o.name for o in answer.outputs] == ["OUTPUT1"]
        difference = np.frombuffer(answer.raw_output_contents[0], dtype="<i4")
        np.testing.assert_array_equal(difference, (a - b).ravel())


async def test_grpc_refusals_carry_status_codes_and_tritons_messages(
    triton: TritonEmulator,
) -> None:
    async with grpc.aio.insecure_channel(triton.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.ModelInfer(pb.ModelInferRequest(model_name="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert unknown.value.details() == "Request for unknown model: 'nope' is not found"
        bad = pb.ModelInferRequest(
            model_name="simple",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="X", datatype="INT32", shape=[1])],
        )
        bad.inputs[0].contents.int_contents.append(1)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await stub.ModelInfer(bad)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unexpected inference input 'X'" in (invalid.value.details() or "")


async def test_grpc_repository_load_and_unload(triton: TritonEmulator) -> None:
    async with grpc.aio.insecure_channel(triton.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="simple"))
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="simple"))).ready
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        states = {row.name: (row.state, row.reason) for row in index.models}
        assert states["simple"] == ("UNAVAILABLE", "unloaded")
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="simple"))).ready
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# --------------------------------------------------------------------------- the command


async def test_dev_triton_serves_three_ports_and_stops_on_sigterm() -> None:
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "dev",
        "triton",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        "--load-model",
        "simple",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                assert process.returncode is None, "the emulator exited before it was ready"
                try:
                    async with session.get(f"http://127.0.0.1:{http_port}/v2/health/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "/v2/health/ready never answered 200"
                await asyncio.sleep(0.1)
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert 'nv_inference_count{gpu_uuid="GPU-' in await response.text()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
            assert [row.name for row in index.models] == ["simple"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_dev_triton_refuses_an_unknown_model() -> None:
    result = CliRunner().invoke(dev_group, ["triton", "--load-model", "resnet"])
    assert result.exit_code == 2
    assert "unknown model(s) resnet" in result.output
    assert "simple, simple_string, identity_fp32" in result.output


async def test_the_dev_slowdown_route_slows_every_execution(triton: TritonEmulator) -> None:
    url = triton.http_url + "/infermesh/dev/slowdown"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            assert await response.json() == {"factor": 1.0}
        async with session.put(url, json={"factor": 3}) as response:
            assert response.status == 200
            assert await response.json() == {"factor": 3.0}
        async with session.put(url, json={"factor": 0.5}) as response:
            assert response.status == 400
            assert "factor must be a number >= 1" in (await response.json())["error"]
    assert triton.core.slowdown == 3.0
    client = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    data = np.ones((1, 16), dtype=np.int32)
    try:
        await client.infer("simple", simple_inputs(data, data))
    finally:
        await client.close()
    page = await metrics(triton)
    # The FAST profile executes in 1 ms; three times slower is at least 3 ms (3000 µs).
    assert series(page, "nv_inference_compute_infer_duration_us", model="simple") >= 3000


async def test_a_client_that_goes_away_counts_as_a_canceled_failure(start: StartTriton) -> None:
    slow = GpuProfile(
        name="a10",
        gpu_name="test",
        prefill_tokens_per_s=1_000_000.0,
        step_base_s=5.0,
        step_per_seq_s=0.0,
        num_gpu_blocks=1024,
        max_model_len=2048,
    )
    triton = await start(profile=slow)
    body = {
        "inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "INT32", "data": [1] * 16},
        ]
    }
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with session.post(
                triton.http_url + "/v2/models/simple/infer",
                json=body,
                timeout=aiohttp.ClientTimeout(total=0.3),
            ):
                pass
    deadline = time.monotonic() + 10
    while (
        series(
            await metrics(triton), "nv_inference_request_failure", model="simple", reason="CANCELED"
        )
        < 1
    ):
        assert time.monotonic() < deadline, "the abandoned request was never counted"
        await asyncio.sleep(0.05)
    assert series(await metrics(triton), "nv_inference_request_success", model="simple") == 0


async def test_tritons_own_grpc_client_works_against_the_emulator(
    triton: TritonEmulator,
) -> None:
    script = Path(__file__).with_name("triton_grpc_client.py")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        triton.grpc_target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    assert (seen["live"], seen["ready"], seen["server"]) == (True, True, "triton")
    assert seen["inputs"] == ["INPUT0", "INPUT1"]
    assert seen["sum"] == [[i + 2 for i in range(16)]]
    assert seen["difference"] == [[i - 2 for i in range(16)]]
    assert seen["id"] == "tc-1"
    assert seen["index"] == ["identity_fp32", "simple", "simple_string"]
    assert (seen["ready_after_unload"], seen["ready_after_load"]) == (False, True)
    assert seen["unknown_model"] == [
        "StatusCode.NOT_FOUND",
        "Request for unknown model: 'nope' is not found",
    ]

"""Reading Triton's metrics page, repository index and readiness, on recorded-format pages.

The pages under pages/ follow the exposition of Triton 2.x's metrics port (names, HELP texts,
label order and units as in triton-inference-server/core `src/metrics.cc`): counters without a
`_total` suffix, durations in µs, the opt-in first-response histogram in ms.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.core.model import TargetKey
from infermesh.triton.metrics import MetricsReading, TritonPageError, read_metrics
from infermesh.triton.parse import (
    IndexEntry,
    build_states,
    estimate,
    health_from_status,
    read_index,
)

PAGES = Path(__file__).parent / "pages"
GPU = "GPU-7f0b3c1e-1a2b-4c3d-9e8f-0a1b2c3d4e5f"
ENDPOINT = "http://10.0.0.7:8000"


def page(name: str) -> str:
    return (PAGES / name).read_text()


def reading(name: str, now: float = 100.0) -> MetricsReading:
    return read_metrics(page(name), now)


def scaled(text: str, factor: float) -> str:
    """A later page: every counter of model `simple` version 1 times `factor`."""
    lines = []
    for line in text.splitlines():
        if 'model="simple"' in line and 'version="1"' in line and "pending" not in line:
            name, value = line.rsplit(" ", 1)
            line = f"{name} {float(value) * factor:g}"
        lines.append(line)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- metrics page


def test_counters_are_read_per_model_and_version_in_their_units() -> None:
    found = reading("gpu_two_models.txt")
    densenet = found.versions[("densenet_onnx", "1")]
    assert densenet.success == 120
    assert densenet.failure == 3  # BACKEND 1 + OTHER 2: every reason counts
    assert densenet.inference_count == 480
    assert densenet.exec_count == 60
    assert densenet.pending == 3
    assert densenet.request_us == 2_400_000
    assert densenet.queue_us == 600_000
    assert densenet.compute_us == 60_000 + 1_680_000 + 60_000
    assert densenet.gpu_uuids == (GPU,)
    assert set(found.versions) == {("densenet_onnx", "1"), ("simple", "1"), ("simple", "2")}


def test_gpu_gauges_keep_tritons_units() -> None:
    gpu = reading("gpu_two_models.txt").gpus[GPU]
    assert gpu.utilization == 0.64  # a 0-1 ratio, not a percentage
    assert gpu.memory_total_bytes == 80 * 1024**3
    assert gpu.memory_used_bytes == 20 * 1024**3
    assert gpu.power_w == 412.5
    assert gpu.power_limit_w == 700


def test_a_model_is_its_versions_summed() -> None:
    simple = reading("gpu_two_models.txt").model("simple")
    assert simple is not None
    assert simple.success == 50
    assert simple.pending == 1
    assert reading("gpu_two_models.txt").model("absent") is None


def test_series_split_by_gpu_are_summed_and_name_every_gpu() -> None:
    found = reading("two_gpus.txt")
    resnet = found.versions[("resnet", "1")]
    assert resnet.success == 50
    assert resnet.pending == 3
    assert resnet.gpu_uuids == (
        "GPU-aaaaaaaa-0000-0000-0000-000000000001",
        "GPU-aaaaaaaa-0000-0000-0000-000000000002",
    )
    # Families this page lacks (durations, exec counts) read as zero, not as an error.
    assert resnet.request_us == 0
    assert found.gpus["GPU-aaaaaaaa-0000-0000-0000-000000000002"].memory_total_bytes is None


def test_a_cpu_only_server_has_no_gpus_and_the_first_response_histogram_is_read_in_ms() -> None:
    found = reading("cpu_only_histogram.txt")
    assert found.gpus == {}
    bert = found.versions[("bert", "3")]
    assert bert.gpu_uuids == ()
    assert bert.failure == 2  # REJECTED
    assert bert.first_response_ms is not None
    assert bert.first_response_ms.mean == 45.0
    assert estimate(bert, None, 0.0).first_response_s == pytest.approx(0.045)


def test_a_server_without_loaded_models_reads_empty() -> None:
    found = reading("no_models.txt")
    assert found.versions == {}
    assert list(found.gpus) == ["GPU-0d8e1f2a-3b4c-5d6e-7f80-91a2b3c4d5e6"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("html_error.txt", "not Prometheus text; is the URL Triton's metrics endpoint"),
        ("malformed.txt", "malformed metrics page, line 3"),
    ],
)
def test_garbage_pages_are_clear_errors(name: str, message: str) -> None:
    with pytest.raises(TritonPageError, match=message) as error:
        read_metrics(page(name), 0.0, "http://10.0.0.7:8002/metrics")
    assert error.value.url == "http://10.0.0.7:8002/metrics"


# --------------------------------------------------------------------------- estimates


def test_rates_and_latencies_come_from_the_window_between_two_pages() -> None:
    before = reading("gpu_two_models.txt", now=100.0).versions[("simple", "1")]
    after = read_metrics(scaled(page("gpu_two_models.txt"), 2), 110.0).versions[("simple", "1")]
    figures = estimate(after, before, 10.0)
    assert figures.service_rate_rps == 4.0  # 40 more successes in 10 s
    assert figures.e2e_s == pytest.approx(80_000 / 40 / 1e6)  # 2 ms a request
    assert figures.queue_s == pytest.approx(4_000 / 40 / 1e6)
    assert figures.compute_s == pytest.approx(74_000 / 40 / 1e6)
    assert figures.batch_size == 1.0
    assert figures.executing == pytest.approx(74_000 / 10e6)
    assert figures.failure_ratio == 0.0


def test_an_idle_window_keeps_the_means_since_the_load() -> None:
    current = reading("gpu_two_models.txt").versions[("densenet_onnx", "1")]
    figures = estimate(current, current, 5.0)
    assert figures.service_rate_rps == 0.0
    assert figures.e2e_s == pytest.approx(2_400_000 / 120 / 1e6)
    assert figures.batch_size == 8.0  # 480 inferences in 60 executions
    assert figures.executing == 0.0


def test_counters_that_restart_after_a_reload_count_from_zero() -> None:
    before = reading("gpu_two_models.txt").versions[("simple", "1")]
    after = read_metrics(scaled(page("gpu_two_models.txt"), 0.25), 110.0).versions[("simple", "1")]
    figures = estimate(after, before, 10.0)
    assert figures.service_rate_rps == 1.0  # the 10 requests since the reload
    assert figures.e2e_s == pytest.approx(20_000 / 10 / 1e6)


def test_failures_show_as_a_ratio_of_the_window() -> None:
    text = page("gpu_two_models.txt")
    before = read_metrics(text, 0.0).versions[("densenet_onnx", "1")]
    later = text.replace(
        'model="densenet_onnx",reason="OTHER",version="1"} 2',
        'model="densenet_onnx",reason="OTHER",version="1"} 12',
    ).replace(
        'nv_inference_request_success{gpu_uuid="'
        + GPU
        + '",model="densenet_onnx",version="1"} 120',
        'nv_inference_request_success{gpu_uuid="'
        + GPU
        + '",model="densenet_onnx",version="1"} 150',
    )
    after = read_metrics(later, 10.0).versions[("densenet_onnx", "1")]
    assert estimate(after, before, 10.0).failure_ratio == pytest.approx(10 / 40)


# --------------------------------------------------------------------------- index, health, states


def test_the_repository_index_is_read_with_and_without_states() -> None:
    entries = read_index(
        b'[{"name":"simple","version":"1","state":"READY","reason":""},{"name":"never"}]', "u"
    )
    assert entries == (IndexEntry("simple", "1", "READY", ""), IndexEntry("never"))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "not JSON"),
        (b'{"models": []}', "not a JSON list"),
        (b'[{"version": "1"}]', "entry 0 has no string 'name'"),
    ],
)
def test_a_bad_repository_index_is_a_clear_error(body: bytes, message: str) -> None:
    with pytest.raises(TritonPageError, match=message):
        read_index(body, "http://10.0.0.7:8000/v2/repository/index")


def test_readiness_codes() -> None:
    assert health_from_status(200) == (True, "")
    healthy, reason = health_from_status(400)
    assert not healthy
    assert "not ready" in reason
    assert "HTTP 503" in health_from_status(503)[1]


def index(*rows: tuple[str, str, str, str]) -> list[IndexEntry]:
    return [IndexEntry(*row) for row in rows]


def test_states_have_one_target_per_loaded_model_with_tritons_figures() -> None:
    states = build_states(
        node="n1",
        endpoint=ENDPOINT,
        reading=reading("gpu_two_models.txt"),
        previous=None,
        index=index(
            ("densenet_onnx", "1", "READY", ""),
            ("simple", "1", "READY", ""),
            ("simple", "2", "READY", ""),
            ("never_loaded", "", "", ""),
        ),
        ready_status=200,
        now=100.0,
    )
    assert sorted(key.model for key in states) == ["densenet_onnx", "simple"]
    densenet = states[TargetKey(model="densenet_onnx", node="n1", endpoint=ENDPOINT)]
    assert densenet.waiting == 3
    assert densenet.e2e_s == pytest.approx(0.02)
    assert densenet.loaded
    assert densenet.healthy
    assert densenet.labels.runtime == "triton"
    assert densenet.labels.gpu_uuid == GPU
    simple = states[TargetKey(model="simple", node="n1", endpoint=ENDPOINT)]
    assert dict(simple.labels.custom)["triton_versions"] == "1,2"
    assert simple.waiting == 1


def test_an_unloaded_model_is_not_loaded_and_says_why() -> None:
    states = build_states(
        node="n1",
        endpoint=ENDPOINT,
        reading=reading("no_models.txt"),
        previous=None,
        index=index(("simple", "1", "UNAVAILABLE", "unloaded")),
        ready_status=200,
        now=1.0,
    )
    (state,) = states.values()
    assert not state.loaded
    assert not state.healthy
    assert (
        state.health_reason == "Triton model 'simple' has no READY version: UNAVAILABLE (unloaded)"
    )
    assert state.e2e_s is None


def test_a_server_that_is_not_ready_makes_every_model_unhealthy() -> None:
    states = build_states(
        node="n1",
        endpoint=ENDPOINT,
        reading=reading("gpu_two_models.txt"),
        previous=None,
        index=index(("simple", "1", "READY", "")),
        ready_status=400,
        now=1.0,
    )
    (state,) = states.values()
    assert state.loaded
    assert not state.healthy
    assert "/v2/health/ready returned 400" in state.health_reason

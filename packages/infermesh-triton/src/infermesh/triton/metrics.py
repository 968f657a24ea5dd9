"""Read Triton's metrics page (port 8002) into per model/version counters and per-GPU gauges.

Sans-I/O and clock-free: page text in, a MetricsReading out, or TritonPageError saying what is
wrong. Knows Triton's metric names and units (µs counters, ms first-response histogram, 0-1
GPU utilisation, bytes, watts); never computes rates (see parse.py). Series that a Triton build
or configuration does not expose are absent, never an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs

from infermesh.core.prometheus import Histogram, MetricsParseError, Sample, parse_samples

__all__ = [
    "FAMILIES",
    "GpuReading",
    "MetricsReading",
    "TritonPageError",
    "VersionReading",
    "read_metrics",
]

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
INFERENCE_COUNT = "nv_inference_count"
EXEC_COUNT = "nv_inference_exec_count"
PENDING = "nv_inference_pending_request_count"
REQUEST_US = "nv_inference_request_duration_us"
QUEUE_US = "nv_inference_queue_duration_us"
COMPUTE_INPUT_US = "nv_inference_compute_input_duration_us"
COMPUTE_INFER_US = "nv_inference_compute_infer_duration_us"
COMPUTE_OUTPUT_US = "nv_inference_compute_output_duration_us"
FIRST_RESPONSE_MS = "nv_inference_first_response_histogram_ms"  # opt-in histogram, in ms
GPU_UTILIZATION = "nv_gpu_utilization"
GPU_MEMORY_TOTAL = "nv_gpu_memory_total_bytes"
GPU_MEMORY_USED = "nv_gpu_memory_used_bytes"
GPU_POWER = "nv_gpu_power_usage"
GPU_POWER_LIMIT = "nv_gpu_power_limit"

_COUNTERS = {
    SUCCESS: "success",
    FAILURE: "failure",
    INFERENCE_COUNT: "inference_count",
    EXEC_COUNT: "exec_count",
    PENDING: "pending",
    REQUEST_US: "request_us",
    QUEUE_US: "queue_us",
    COMPUTE_INPUT_US: "compute_input_us",
    COMPUTE_INFER_US: "compute_infer_us",
    COMPUTE_OUTPUT_US: "compute_output_us",
}
_GPU_GAUGES = {
    GPU_UTILIZATION: "utilization",
    GPU_MEMORY_TOTAL: "memory_total_bytes",
    GPU_MEMORY_USED: "memory_used_bytes",
    GPU_POWER: "power_w",
    GPU_POWER_LIMIT: "power_limit_w",
}
FAMILIES: frozenset[str] = frozenset(
    {*_COUNTERS, *_GPU_GAUGES, FIRST_RESPONSE_MS + "_sum", FIRST_RESPONSE_MS + "_count"}
)


class TritonPageError(ValueError):
    """A Triton endpoint answered with something this adapter cannot read; says why.

    `url` is the endpoint whose answer was bad.
    """

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


@attrs.frozen
class VersionReading:
    """The counters of one model version, cumulative since it was loaded (durations in µs)."""

    success: float = 0.0
    failure: float = 0.0
    """All failure reasons together."""
    inference_count: float = 0.0
    exec_count: float = 0.0
    pending: float = 0.0
    request_us: float = 0.0
    queue_us: float = 0.0
    compute_input_us: float = 0.0
    compute_infer_us: float = 0.0
    compute_output_us: float = 0.0
    first_response_ms: Histogram | None = None
    gpu_uuids: tuple[str, ...] = ()
    """GPUs the model's instances run on (the series' `gpu_uuid` labels)."""

    @property
    def compute_us(self) -> float:
        return self.compute_input_us + self.compute_infer_us + self.compute_output_us

    def __add__(self, other: VersionReading) -> VersionReading:
        """Two readings summed (versions of one model; series split by GPU)."""
        first = self.first_response_ms
        second = other.first_response_ms
        histogram = first if second is None else second if first is None else first + second
        values = {
            field: getattr(self, field) + getattr(other, field) for field in _COUNTERS.values()
        }
        return VersionReading(
            **values,
            first_response_ms=histogram,
            gpu_uuids=tuple(sorted({*self.gpu_uuids, *other.gpu_uuids})),
        )


@attrs.frozen
class GpuReading:
    """One GPU as Triton reports it (utilisation 0-1, bytes, watts); None: not on the page."""

    uuid: str
    utilization: float | None = None
    memory_total_bytes: float | None = None
    memory_used_bytes: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


@attrs.frozen
class MetricsReading:
    """Everything read from one page, stamped with the time the scrape started."""

    taken_at: float
    versions: Mapping[tuple[str, str], VersionReading]
    """Per (model, version)."""
    gpus: Mapping[str, GpuReading]
    """Per GPU UUID."""

    def model(self, name: str) -> VersionReading | None:
        """The model's versions summed, or None when the page has no series of it."""
        found = [reading for (model, _), reading in self.versions.items() if model == name]
        if not found:
            return None
        total = found[0]
        for reading in found[1:]:
            total = total + reading
        return total


def read_metrics(text: str, now: float, url: str = "/metrics") -> MetricsReading:
    """Read a Triton metrics page. Raises TritonPageError for a malformed or non-metrics page."""
    head = text.lstrip()[:1]
    if head in ("<", "{", "["):
        raise TritonPageError(
            "the answer is HTML or JSON, not Prometheus text; is the URL Triton's metrics "
            "endpoint (port 8002, path /metrics)?",
            url,
        )
    try:
        found = parse_samples(text, FAMILIES)
    except MetricsParseError as exc:
        raise TritonPageError(f"malformed metrics page, {exc}", url) from None
    per_series: dict[tuple[str, str], dict[str, float]] = {}
    gpus_of: dict[tuple[str, str], set[str]] = {}
    for family, field in _COUNTERS.items():
        for sample in found[family]:
            key = _model_key(sample)
            if key is None or not math.isfinite(sample.value):
                continue
            values = per_series.setdefault(key, {})
            values[field] = values.get(field, 0.0) + sample.value
            uuid = sample.labels.get("gpu_uuid")
            if uuid:
                gpus_of.setdefault(key, set()).add(uuid)
    histograms = _first_response(found)
    versions = {
        key: VersionReading(
            **values,
            first_response_ms=histograms.get(key),
            gpu_uuids=tuple(sorted(gpus_of.get(key, ()))),
        )
        for key, values in per_series.items()
    }
    return MetricsReading(taken_at=now, versions=versions, gpus=_gpus(found))


def _model_key(sample: Sample) -> tuple[str, str] | None:
    model = sample.labels.get("model")
    if not model:
        return None
    return model, sample.labels.get("version", "")


def _first_response(found: Mapping[str, Sequence[Sample]]) -> dict[tuple[str, str], Histogram]:
    grouped: dict[tuple[str, str], list[Sample]] = {}
    for suffix in ("_sum", "_count"):
        for sample in found[FIRST_RESPONSE_MS + suffix]:
            key = _model_key(sample)
            if key is not None:
                grouped.setdefault(key, []).append(sample)
    return {key: Histogram.from_samples(samples) for key, samples in grouped.items()}


def _gpus(found: Mapping[str, Sequence[Sample]]) -> dict[str, GpuReading]:
    values: dict[str, dict[str, float]] = {}
    for family, field in _GPU_GAUGES.items():
        for sample in found[family]:
            uuid = sample.labels.get("gpu_uuid")
            if uuid and math.isfinite(sample.value):
                values.setdefault(uuid, {})[field] = sample.value
    return {uuid: GpuReading(uuid=uuid, **fields) for uuid, fields in sorted(values.items())}

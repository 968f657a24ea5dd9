"""Triton's metrics page (port 8002) for the emulator: real names, HELP texts, labels and units.

Writes the classic text format as Triton's prometheus-cpp exposer does: counters without a
`_total` suffix, labels sorted by name, durations in microseconds, GPU utilisation as a 0-1
ratio, memory in bytes, power in watts. Pure rendering; never reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from infermesh.dev.triton_models import FAILURE_REASONS, ModelStats

__all__ = ["CONTENT_TYPE", "GpuReading", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_MODEL_FAMILIES: tuple[tuple[str, str, str], ...] = (
    (
        "nv_inference_request_success",
        "counter",
        "Number of successful inference requests, all batch sizes",
    ),
    (
        "nv_inference_request_failure",
        "counter",
        "Number of failed inference requests, all batch sizes",
    ),
    (
        "nv_inference_count",
        "counter",
        "Number of inferences performed (does not include cached requests)",
    ),
    (
        "nv_inference_exec_count",
        "counter",
        "Number of model executions performed (does not include cached requests)",
    ),
    (
        "nv_inference_request_duration_us",
        "counter",
        "Cumulative inference request duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_queue_duration_us",
        "counter",
        "Cumulative inference queuing duration in microseconds (includes cached requests)",
    ),
    (
        "nv_inference_compute_input_duration_us",
        "counter",
        "Cumulative compute input duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_infer_duration_us",
        "counter",
        "Cumulative compute inference duration in microseconds (does not include cached requests)",
    ),
    (
        "nv_inference_compute_output_duration_us",
        "counter",
        "Cumulative inference compute output duration in microseconds "
        "(does not include cached requests)",
    ),
    (
        "nv_inference_pending_request_count",
        "gauge",
        "Instantaneous number of pending requests awaiting execution per-model.",
    ),
)

_STAT_FIELD = {
    "nv_inference_request_success": "success",
    "nv_inference_count": "inference_count",
    "nv_inference_exec_count": "exec_count",
    "nv_inference_request_duration_us": "request_us",
    "nv_inference_queue_duration_us": "queue_us",
    "nv_inference_compute_input_duration_us": "compute_input_us",
    "nv_inference_compute_infer_duration_us": "compute_infer_us",
    "nv_inference_compute_output_duration_us": "compute_output_us",
    "nv_inference_pending_request_count": "pending",
}


@attrs.frozen
class GpuReading:
    """The GPU metrics Triton collects through DCGM, for one device."""

    uuid: str
    utilization: float
    memory_total_bytes: int
    memory_used_bytes: int
    power_w: float
    power_limit_w: float
    energy_j: float


def _labels(pairs: Mapping[str, str]) -> str:
    inner = ",".join(f'{name}="{_escape(value)}"' for name, value in sorted(pairs.items()))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def render_metrics(
    stats: Mapping[tuple[str, str], ModelStats], gpus: Iterable[GpuReading] = ()
) -> str:
    """The page: per model/version series (gpu_uuid label when the model runs on one GPU)."""
    gpu_list = list(gpus)
    gpu_label = {"gpu_uuid": gpu_list[0].uuid} if len(gpu_list) == 1 else {}
    lines: list[str] = []
    for family, kind, help_text in _MODEL_FAMILIES:
        lines.append(f"# HELP {family} {help_text}")
        lines.append(f"# TYPE {family} {kind}")
        for (model, version), model_stats in sorted(stats.items()):
            base = {"model": model, "version": version, **gpu_label}
            if family == "nv_inference_request_failure":
                for reason in FAILURE_REASONS:
                    labels = _labels({**base, "reason": reason})
                    lines.append(f"{family}{labels} {model_stats.failure[reason]}")
                continue
            value = getattr(model_stats, _STAT_FIELD[family])
            lines.append(f"{family}{_labels(base)} {_number(value)}")
    if gpu_list:
        gpu_families: tuple[tuple[str, str, str, str], ...] = (
            ("nv_gpu_utilization", "gauge", "GPU utilization rate [0.0 - 1.0)", "utilization"),
            (
                "nv_gpu_memory_total_bytes",
                "gauge",
                "GPU total memory, in bytes",
                "memory_total_bytes",
            ),
            ("nv_gpu_memory_used_bytes", "gauge", "GPU used memory, in bytes", "memory_used_bytes"),
            ("nv_gpu_power_usage", "gauge", "GPU power usage in watts", "power_w"),
            ("nv_gpu_power_limit", "gauge", "GPU power management limit in watts", "power_limit_w"),
            (
                "nv_energy_consumption",
                "counter",
                "GPU energy consumption in joules since the Triton Server started",
                "energy_j",
            ),
        )
        for family, kind, help_text, field in gpu_families:
            lines.append(f"# HELP {family} {help_text}")
            lines.append(f"# TYPE {family} {kind}")
            for gpu in gpu_list:
                value = getattr(gpu, field)
                lines.append(f"{family}{_labels({'gpu_uuid': gpu.uuid})} {_number(value)}")
    return "\n".join(lines) + "\n"

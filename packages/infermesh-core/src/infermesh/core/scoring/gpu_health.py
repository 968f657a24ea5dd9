"""GPU health in scoring: the filter that removes targets on a faulty GPU and the scorer that
sends less work to a throttled, hot or memory-starved one.

A target runs on the GPUs `StateStore.gpus_for` returns (its `gpu_uuid` label: from
`[[runtimes]] gpus`, else discovered by its adapter, e.g. Triton's `gpu_uuid` metric labels,
else by the `nvml` GPU source from the processes NVML lists on each GPU). A
target on several GPUs is as healthy as its worst GPU: the filter excludes it when any of them
has a fault, and the scorer gives it the lowest of their scores.

- Faults (`GpuState.health`: uncorrectable ECC, row remapping, a non-application XID such as
  79 "GPU has fallen off the bus") exclude the target with the reason, e.g.
  `GPU GPU-1 unhealthy: XID 79 reported`. They count whatever the telemetry's age: the last
  word about a GPU is a fault until a newer reading clears it.
- Degradations only lower the `gpu_health` score: thermal or power throttling (the clock-event
  reasons of `GpuState.throttle_reasons`), a temperature above `hot_c`, VRAM headroom below
  `low_headroom`. Each one's factor multiplies the GPU's score; the reason names each factor.
- Telemetry older than `stale_after_s` (the `[scoring]` value) is not used for degradations:
  the GPU scores a neutral 1 with the age in the reason. Stale GPU telemetry is not a reason
  to exclude: a telemetry exporter that stops must not take healthy replicas out of rotation;
  a GPU that is really lost stops its runtime (whose own telemetry then goes unhealthy or
  stale) and reports XID 79.

Pure functions of the views: no clock (the view carries `now`), no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import attrs

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import PerTargetScorer, ScoreResult, TargetView
from infermesh.core.model import GpuState, RequestFeatures
from infermesh.core.scoring.columns import (
    ColumnScorer,
    ScoreColumn,
    constant_column,
    results_column,
)
from infermesh.core.scoring.views import table_of

__all__ = [
    "THROTTLE_FACTORS",
    "GpuHealthScorer",
    "gpu_exclusion_reason",
    "gpu_score",
]

THROTTLE_FACTORS: dict[str, float] = {
    "hw_slowdown": 0.4,
    "hw_thermal_slowdown": 0.4,
    "hw_power_brake_slowdown": 0.4,
    "sw_thermal_slowdown": 0.6,
    "sw_power_cap": 0.85,
}
"""Score factor per active clock-event reason (NVML names): the hardware slowdowns roughly halve
the clocks, software thermal slowdown lowers them less, a power cap a little."""


def gpu_exclusion_reason(gpus: Iterable[GpuState]) -> str | None:
    """Why a target on `gpus` must not get requests (the first faulty GPU), or None."""
    for gpu in gpus:
        healthy, reason = gpu.health
        if not healthy:
            return f"GPU {gpu.key.gpu_uuid} unhealthy: {reason}"
    return None


def gpu_score(
    gpu: GpuState,
    now: float,
    *,
    stale_after_s: float = 5.0,
    warm_c: float = 80.0,
    hot_c: float = 90.0,
    hot_factor: float = 0.6,
    low_headroom: float = 0.1,
    min_headroom_factor: float = 0.5,
) -> tuple[float, str]:
    """(score 0..1, reason) of one GPU's condition: 1 for a cool, unthrottled GPU with memory to
    spare, lower for each degradation (factors multiply).

    Temperature: 1 up to `warm_c`, falling linearly to `hot_factor` at `hot_c` and above.
    VRAM: 1 down to `low_headroom` free, falling linearly to `min_headroom_factor` at 0 free
    (ignored when the total is unknown).
    """
    name = gpu.key.gpu_uuid
    age_s = now - gpu.last_updated
    if age_s > stale_after_s:
        why = f"telemetry {age_s:.1f}s old (stale after {stale_after_s:g}s): not used"
        return 1.0, f"GPU {name} {why}"
    score = 1.0
    notes: list[str] = []
    for reason in gpu.throttle_reasons:
        factor = THROTTLE_FACTORS.get(reason, 1.0)
        score *= factor
        notes.append(f"throttled {reason} x{factor:g}")
    temperature = gpu.temperature_c
    if math.isfinite(temperature) and temperature > warm_c:
        span = max(hot_c - warm_c, 1e-9)
        heat = min(1.0, (temperature - warm_c) / span)
        factor = 1.0 - heat * (1.0 - hot_factor)
        score *= factor
        notes.append(f"{temperature:.0f}C > {warm_c:g}C x{factor:.2f}")
    if gpu.memory_total_bytes > 0:
        headroom = gpu.vram_headroom
        if headroom < low_headroom:
            fill = (low_headroom - headroom) / low_headroom
            factor = 1.0 - fill * (1.0 - min_headroom_factor)
            score *= factor
            notes.append(f"VRAM {headroom:.0%} free < {low_headroom:.0%} x{factor:.2f}")
    if not notes:
        return 1.0, f"GPU {name} ok"
    return score, f"GPU {name} " + ", ".join(notes)


@attrs.frozen
class GpuHealthScorer(ColumnScorer, PerTargetScorer):
    """Sends less work to targets whose GPUs are throttled, hot or short of memory.

    score = the lowest `gpu_score` of the target's GPUs (1 without GPU telemetry). Faulty GPUs
    never reach the scorer: the engine's filter has excluded their targets
    (`gpu_exclusion_reason`). Default weight 2, like `queue`: a GPU throttled to 0.4 costs a
    target as much as an extra mean load's worth of queue.
    """

    stale_after_s: float = 5.0
    name: str = "gpu_health"
    default_weight: float = 2.0

    def configured(self, scoring: ScoringConfig) -> GpuHealthScorer:
        return attrs.evolve(self, stale_after_s=scoring.stale_after_s)

    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        # A target without GPU telemetry gets the one shared result, without a call.
        stale_after_s = self.stale_after_s
        table = table_of(targets)
        if not any(table.gpus):
            return constant_column(_NO_GPUS, len(table))
        now_of = table.now_of
        return results_column(
            [
                _worst(gpus, now_of(i), stale_after_s) if gpus else _NO_GPUS
                for i, gpus in enumerate(table.gpus)
            ]
        )

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        gpus = target.gpus
        if not gpus:
            return _NO_GPUS
        return _worst(gpus, target.now, self.stale_after_s)


_NO_GPUS = ScoreResult(1.0, "no GPU telemetry")


# id(GpuState) -> (it, its fresh score and reason): a GpuState is immutable and replaced on
# every change, so its fresh score is computed once, not on every request.
_FRESH: dict[int, tuple[GpuState, tuple[float, str]]] = {}
_FRESH_SIZE = 4096


def _scored(gpu: GpuState, now: float, stale_after_s: float) -> tuple[float, str]:
    if now - gpu.last_updated > stale_after_s:
        return gpu_score(gpu, now, stale_after_s=stale_after_s)
    cached = _FRESH.get(id(gpu))
    if cached is not None and cached[0] is gpu:
        return cached[1]
    result = gpu_score(gpu, now, stale_after_s=stale_after_s)
    if len(_FRESH) >= _FRESH_SIZE:
        _FRESH.clear()
    _FRESH[id(gpu)] = (gpu, result)
    return result


def _worst(gpus: Sequence[GpuState], now: float, stale_after_s: float) -> ScoreResult:
    scored = [_scored(gpu, now, stale_after_s) for gpu in gpus]
    score, reason = min(scored, key=lambda sr: sr[0])
    if len(gpus) > 1:
        reason = f"{reason} (worst of {len(gpus)} GPUs)"
    return ScoreResult(score, reason)

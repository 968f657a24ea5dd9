"""The built-in scorers: queue (work left), KV-cache headroom, prefix affinity
(infermesh.core.scoring.prefix), network RTT, GPU health (infermesh.core.scoring.gpu_health).

Each is a plain Scorer registered through `infermesh_register_scorers`, exactly as a third-party
scorer would be. Pure functions of (request, candidate views): no clock, no I/O, no state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import attrs

from infermesh.core.contracts import PerTargetScorer, ScoreResult, TargetView
from infermesh.core.model import RequestFeatures
from infermesh.core.scoring.capacity import Speed, kv_permille, median_tokens
from infermesh.core.scoring.columns import (
    ColumnScorer,
    ScoreColumn,
    constant_column,
    results_column,
)
from infermesh.core.scoring.gpu_health import GpuHealthScorer
from infermesh.core.scoring.prefix import PrefixAffinityScorer, hrw_weight, target_hash
from infermesh.core.scoring.rows import row_field
from infermesh.core.scoring.views import table_of

__all__ = [
    "GpuHealthScorer",
    "KvHeadroomScorer",
    "NetPenaltyScorer",
    "PrefixAffinityScorer",
    "QueueScorer",
    "builtin_scorers",
    "hrw_weight",
    "target_hash",
]

_IDLE_WORK_S = row_field("idle_work_s")
_KV_PERMILLE = row_field("kv_permille")

# Work left below this is "idle": differences smaller than it should not move traffic.
WORK_FLOOR_S = 0.05
# Work left above this is treated as this (keeps the arithmetic finite on absurd telemetry).
WORK_CEILING_S = 1e6


class QueueScorer(ColumnScorer):
    """Prefers targets with less work left, corrected for what the routers did since the scrape
    (in-flight requests added, finished ones taken off: `TargetView.expected_work_left_s`).

    score = 1 / (1 + work_left / reference) where reference is the mean work left across the
    candidates (at least WORK_FLOOR_S): an idle target scores 1, one with the mean load 0.5, a
    saturated one near 0.

    Work left is in seconds of each target's own measured speed (infermesh.core.scoring.
    capacity): a GPU that decodes twice as fast drains the same queue in half the time, so it
    gets about twice the work.
    """

    name = "queue"
    default_weight = 2.0

    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        # Capacity by measured throughput: each target's work in seconds of its own speed.
        # Each state's rate, decode tokens and service time: computed once per state change.
        table = table_of(targets)
        features = table.features
        tokens: float | None = None
        if any(f.speed is not None for f in features):
            measured_tokens = sorted(
                f.decode_tokens for f in features if f.decode_tokens is not None
            )
            tokens = median_tokens(measured_tokens, request)
        # With nothing in flight or finished since the scrape, a target's work left is its
        # row's `idle_work_s`; otherwise `view.expected_work_left_s`.
        work: list[float] = list(map(_IDLE_WORK_S, table.rows))
        finished = table.finished_unseen
        unseen = table.unseen
        if any(finished) or any(unseen):
            for i, (finished_unseen, extra) in enumerate(zip(finished, unseen, strict=True)):
                if finished_unseen > 0:
                    work[i] = table[i].expected_work_left_s
                elif extra != 0.0:
                    # `ModelState.work_left_with_s(extra)`, inlined.
                    state, _, _, service_s = features[i]
                    running = state.running
                    parallel = 1.0 if running < 1.0 else running  # max(running, 1.0)
                    work[i] = (state.waiting + extra + 0.5 * running) * service_s / parallel
        if tokens is not None:
            for i, (_, speed, _, service_s) in enumerate(features):
                if speed is not None:
                    work[i] *= tokens / speed.tokens_per_s / service_s
        # min(w, WORK_CEILING_S); NaN -> 0
        work = [(WORK_CEILING_S if w > WORK_CEILING_S else w) if w >= 0.0 else 0.0 for w in work]
        mean_s = sum(work) / len(work) if work else 0.0
        ref_s = max(mean_s, WORK_FLOOR_S)
        scores = [1.0 / (1.0 + w / ref_s) for w in work]

        def result(i: int) -> ScoreResult:
            speed = features[i].speed
            measured: tuple[float, Speed] | None = None
            if tokens is not None and speed is not None:
                measured = (tokens / speed.tokens_per_s, speed)  # per request, at its speed
            return ScoreResult.deferred(
                scores[i], _queue_reason, work[i], table[i], mean_s, measured, tokens
            )

        return ScoreColumn(scores, result)


def _queue_reason(
    work_s: float,
    view: TargetView,
    mean_s: float,
    measured: tuple[float, Speed] | None = None,
    tokens: float | None = None,
) -> str:
    text = f"work left {work_s * 1000.0:.0f}ms ({_load_text(view)}); mean {mean_s * 1000.0:.0f}ms"
    if measured is not None and tokens is not None:
        per_request_s, speed = measured
        text += (
            f"; {per_request_s * 1000.0:.0f}ms per request at its measured "
            f"{speed.tokens_per_s:.3g} tokens/s per sequence ({speed.source}, "
            f"~{tokens:.0f} tokens per request)"
        )
    return text


def _load_text(view: TargetView) -> str:
    """The corrected load of a target for a reason, with the corrections when there are any."""
    state = view.state
    unseen = view.unseen
    finished = view.finished_unseen
    text = f"running {view.running:g}, waiting {view.waiting:g}, in-flight {unseen:g}"
    if finished <= 0 and unseen == view.in_flight:
        return text
    notes = [f"scraped running {state.running:g}, waiting {state.waiting:g}"]
    if finished > 0:
        notes.append(f"{finished} finished since")
    if unseen != view.in_flight:
        notes.append(f"{unseen - view.in_flight:g} sent before it not counted yet")
    return f"{text}; {'; '.join(notes)}"


class KvHeadroomScorer(ColumnScorer, PerTargetScorer):
    """Prefers targets with free KV-cache blocks: score = 1 - KV-cache usage (to 0.1%)."""

    name = "kv"
    default_weight = 1.0

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        return _kv_result(kv_permille(target.state.kv_cache_usage))

    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        permille: list[int] = list(map(_KV_PERMILLE, table_of(targets).rows))
        return ScoreColumn([_KV_SCORES[p] for p in permille], lambda i: _kv_result(permille[i]))


@lru_cache(maxsize=1001)
def _kv_result(usage_permille: int) -> ScoreResult:
    # One shared result per 0.1% step: this scorer then costs a dict lookup per target.
    return ScoreResult(_KV_SCORES[usage_permille], f"KV cache {usage_permille / 10:g}% used")


_KV_SCORES = [1.0 - permille / 1000.0 for permille in range(1001)]


# An RTT at or below this is as good as local: the score does not tell such targets apart.
LOCAL_RTT_S = 0.001


@attrs.frozen
class NetPenaltyScorer(ColumnScorer, PerTargetScorer):
    """Prefers replicas a short network round trip away (`TargetView.rtt_s`, from Vivaldi).

    score = 1 at an RTT of at most 1 ms, falling linearly to 0 at `penalty_rtt_s` (default
    50 ms) and beyond. An unknown RTT (no estimate yet, or the engine has no estimator, as with
    gossip off) scores 1, like a local target: having no estimate is
    no evidence of distance, and a penalty would push traffic toward whichever nodes happen to
    have been measured. Its default weight (1, against queue 2 and prefix 3) lets it decide only
    when the other scores are close.
    """

    penalty_rtt_s: float = attrs.field(default=0.05)
    name: str = "net_penalty"
    default_weight: float = 1.0

    @penalty_rtt_s.validator
    def _check_penalty(self, attribute: attrs.Attribute[float], value: float) -> None:
        if not (value > LOCAL_RTT_S and math.isfinite(value)):
            raise ValueError(
                f"net_penalty penalty_rtt_s must be a finite number > {LOCAL_RTT_S}, got {value}"
            )

    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        # Most RTTs are unknown (gossip off, or not measured yet): one shared result.
        rtts = table_of(targets).rtts
        if rtts.count(None) == len(rtts):
            return constant_column(_RTT_UNKNOWN, len(rtts))
        rtt_result = self._rtt_result
        return results_column(
            [_RTT_UNKNOWN if rtt_s is None else rtt_result(rtt_s) for rtt_s in rtts]
        )

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        return self._rtt_result(target.rtt_s)

    def _rtt_result(self, rtt_s: float | None) -> ScoreResult:
        if rtt_s is None or rtt_s != rtt_s:  # unknown (or NaN): treated as local
            return _RTT_UNKNOWN
        if rtt_s <= LOCAL_RTT_S:
            score = 1.0
        else:
            span_s = self.penalty_rtt_s - LOCAL_RTT_S
            score = max(0.0, 1.0 - (rtt_s - LOCAL_RTT_S) / span_s)
        return ScoreResult.deferred(score, _rtt_reason, rtt_s)


_RTT_UNKNOWN = ScoreResult(1.0, "rtt unknown: treated as local")


def _rtt_reason(rtt_s: float) -> str:
    return f"rtt {rtt_s * 1000.0:.1f} ms"


def builtin_scorers() -> list[
    QueueScorer | KvHeadroomScorer | PrefixAffinityScorer | NetPenaltyScorer | GpuHealthScorer
]:
    """Fresh instances of the built-in scorers (what the agent's plugin registers)."""
    return [
        QueueScorer(),
        KvHeadroomScorer(),
        PrefixAffinityScorer(),
        NetPenaltyScorer(),
        GpuHealthScorer(),
    ]

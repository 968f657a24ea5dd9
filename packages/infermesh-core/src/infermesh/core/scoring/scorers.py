"""The built-in scorers: queue (work left), KV-cache headroom, prefix affinity, network RTT,
GPU health (infermesh.core.scoring.gpu_health).

Each is a plain Scorer registered through `infermesh_register_scorers`, exactly as a third-party
scorer would be. Pure functions of (request, candidate views): no clock, no I/O, no state.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import attrs

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import PerTargetScorer, ScoreResult, TargetView
from infermesh.core.model import RequestFeatures
from infermesh.core.scoring.capacity import Speed, decode_rate, tokens_per_request
from infermesh.core.scoring.gpu_health import GpuHealthScorer

__all__ = [
    "GpuHealthScorer",
    "KvHeadroomScorer",
    "NetPenaltyScorer",
    "PrefixAffinityScorer",
    "QueueScorer",
    "builtin_scorers",
    "hrw_weight",
]

# Work left below this is "idle": differences smaller than it should not move traffic.
WORK_FLOOR_S = 0.05
# Work left above this is treated as this (keeps the arithmetic finite on absurd telemetry).
WORK_CEILING_S = 1e6
_MASK64 = (1 << 64) - 1


class QueueScorer:
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

    def score(self, request: RequestFeatures, targets: Sequence[TargetView]) -> list[ScoreResult]:
        work: list[float] = []
        speeds: list[tuple[float, Speed] | None] = []
        # Capacity by measured throughput: each target's work in seconds of its own speed.
        rates = [decode_rate(view.state) for view in targets]
        tokens = tokens_per_request(targets, request, rates) if any(rates) else None
        for view, speed in zip(targets, rates, strict=True):
            w = view.expected_work_left_s
            measured: tuple[float, Speed] | None = None
            if tokens is not None and speed is not None:
                per_request_s = tokens / speed.tokens_per_s
                w *= per_request_s / view.state.request_service_s
                measured = (per_request_s, speed)
            speeds.append(measured)
            work.append(min(w, WORK_CEILING_S) if w >= 0.0 else 0.0)  # NaN -> 0
        if not work:
            return []
        mean_s = sum(work) / len(work)
        ref_s = max(mean_s, WORK_FLOOR_S)
        deferred = ScoreResult.deferred
        return [
            deferred(1.0 / (1.0 + w / ref_s), _queue_reason, w, view, mean_s, measured, tokens)
            for view, w, measured in zip(targets, work, speeds, strict=True)
        ]


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


class KvHeadroomScorer(PerTargetScorer):
    """Prefers targets with free KV-cache blocks: score = 1 - KV-cache usage (to 0.1%)."""

    name = "kv"
    default_weight = 1.0

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        usage = target.state.kv_cache_usage
        usage = min(1.0, max(0.0, usage)) if usage == usage else 0.0  # NaN -> unknown -> 0
        return _kv_result(round(usage * 1000))


@lru_cache(maxsize=1001)
def _kv_result(usage_permille: int) -> ScoreResult:
    # One shared result per 0.1% step: this scorer then costs a dict lookup per target.
    return ScoreResult(1.0 - usage_permille / 1000.0, f"KV cache {usage_permille / 10:g}% used")


@lru_cache(maxsize=65536)
def target_hash(target_id: str) -> int:
    """A target id's stable 64-bit hash (its rendezvous and ring position)."""
    return int.from_bytes(hashlib.blake2b(target_id.encode(), digest_size=8).digest(), "big")


def hrw_weight(prefix_key: int, target_id: str) -> int:
    """Rendezvous (highest-random-weight) weight of a target for a prefix key.

    Stable across processes and machines (no per-process hash seed), so every agent that sees
    the same candidates orders them the same way for a prefix.
    """
    x = (prefix_key ^ target_hash(target_id)) & _MASK64
    # splitmix64 finaliser: mixes every input bit into every output bit.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@attrs.frozen
class PrefixAffinityScorer:
    """Keeps requests sharing a prompt prefix on one replica until it is loaded.

    Bounded-load consistent hashing: the candidates are ordered by rendezvous hash of
    (prefix key, target); the first whose load (`TargetView.load`: running + waiting + unseen,
    corrected for what the routers did since the scrape) is below the capacity scores 1, the
    rest 0.
    The capacity is max(ceil(load_factor * (total load + 1) / candidates), min_capacity): the
    bounded-load rule, but never below `min_capacity`, so a replica that batches many sequences
    keeps its prefix (and its prefix cache) while the others are idle. Without a prefix key
    every target scores a neutral 0.5.

    A replica slower than the candidates' median measured decode rate (infermesh.core.scoring.
    capacity) gets that capacity scaled by its relative speed (at least 1): a GPU running at a
    quarter of the median speed keeps about a quarter of the hashed tenants. Faster replicas and
    replicas without a measured rate keep the full capacity.
    """

    load_factor: float = 1.25
    min_capacity: int = 4
    name: str = "prefix"
    default_weight: float = 3.0

    def configured(self, scoring: ScoringConfig) -> PrefixAffinityScorer:
        return attrs.evolve(
            self,
            load_factor=scoring.prefix_load_factor,
            min_capacity=scoring.prefix_min_capacity,
        )

    def score(self, request: RequestFeatures, targets: Sequence[TargetView]) -> list[ScoreResult]:
        count = len(targets)
        prefix_key = request.prefix_key
        if prefix_key == 0 or count == 0:
            neutral = ScoreResult(0.5, "no prefix key: neutral")
            return [neutral] * count
        loads = [v.load for v in targets]
        bounded = math.ceil(self.load_factor * (sum(loads) + 1) / count)
        capacity = max(bounded, self.min_capacity)
        caps = _speed_capacities(targets, capacity)
        weights = [hrw_weight(prefix_key, v.key.target_id) for v in targets]
        order = sorted(range(count), key=weights.__getitem__, reverse=True)
        if caps is None:
            chosen_rank = next((r for r, i in enumerate(order) if loads[i] < capacity), None)
        else:
            chosen_rank = next((r for r, i in enumerate(order) if loads[i] < caps[i][0]), None)
        if chosen_rank is None:  # only reachable with load_factor < 1
            chosen_rank = min(range(count), key=lambda r: loads[order[r]])
        chosen = order[chosen_rank]
        deferred = ScoreResult.deferred
        results: list[ScoreResult] = [_UNSET] * count
        placed = chosen_rank + 1
        for rank, i in enumerate(order):
            mine = i == chosen
            results[i] = deferred(
                1.0 if mine else 0.0,
                _prefix_reason,
                prefix_key,
                rank,
                count,
                loads[i],
                capacity if caps is None else caps[i][0],
                bounded,
                0 if mine else placed,
                1.0 if caps is None else caps[i][1],
            )
        return results


_UNSET = ScoreResult(0.0, "")


def _speed_capacities(
    targets: Sequence[TargetView], capacity: int
) -> list[tuple[int, float]] | None:
    """Each target's prefix capacity and relative speed, or None when no target is slower than
    the median measured decode rate (then every target has `capacity`)."""
    rates = [decode_rate(v.state) for v in targets]
    measured = sorted(r.tokens_per_s for r in rates if r is not None)
    if len(measured) < 2:
        return None
    middle = len(measured) // 2
    median = (
        measured[middle] if len(measured) % 2 else (measured[middle - 1] + measured[middle]) / 2
    )
    if not (median > 0 and measured[0] < median):
        return None
    caps: list[tuple[int, float]] = []
    for rate in rates:
        rel = 1.0 if rate is None else min(1.0, rate.tokens_per_s / median)
        caps.append((capacity if rel >= 1.0 else max(1, math.ceil(capacity * rel)), rel))
    return caps


def _prefix_reason(
    prefix_key: int,
    rank: int,
    count: int,
    load: float,
    capacity: int,
    bounded: int,
    chosen_rank: int,
    speed: float = 1.0,
) -> str:
    """Why a target got its prefix score; `chosen_rank` is 0 for the chosen target itself, else
    the 1-based rendezvous rank of the chosen one."""
    if speed < 1.0:
        capacity_text = f"capacity {capacity} (scaled to its {speed:.2g}x median decode speed)"
    elif capacity > bounded:
        capacity_text = f"capacity {capacity} (minimum; bounded-load {bounded})"
    else:
        capacity_text = f"capacity {capacity} (bounded-load)"
    prefix = f"prefix {prefix_key:016x}"
    if not chosen_rank:
        relation = "<" if load < capacity else ">="
        reason = (
            f"{prefix} placed here (rendezvous rank {rank + 1}/{count}), "
            f"load {load:g} {relation} {capacity_text}"
        )
        if rank:
            reason += f"; spilled past {rank} loaded replica(s)"
        return reason
    if load >= capacity:
        why = f"loaded (load {load:g} >= {capacity_text})"
    else:  # ranked after the chosen one, which is the first with room
        why = f"not chosen: rank {chosen_rank} has room (load {load:g}, {capacity_text})"
    return f"{prefix} rendezvous rank {rank + 1}/{count}, {why}"


# An RTT at or below this is as good as local: the score does not tell such targets apart.
LOCAL_RTT_S = 0.001


@attrs.frozen
class NetPenaltyScorer(PerTargetScorer):
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

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        rtt_s = target.rtt_s
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

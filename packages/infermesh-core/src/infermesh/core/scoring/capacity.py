"""Capacity by measured throughput: each target's work left in seconds of its own speed.

A request's service time on a target is its decode length (tokens) at the target's measured
per-sequence decode rate. The rate is what the runtime reports for that target:

1. `1 / itl_s` — the windowed mean inter-token latency (vLLM's time per output token);
2. else `generation_tokens_per_s / running` — tokens generated per second over the last
   scrape window, per running sequence.

The decode length is the model's typical generated tokens per request, estimated over the
model's candidates as the median of `(e2e_s - ttft_s) * rate` (decode time at the decode rate:
neither includes queueing), else the request's `max_output_tokens`. So a GPU that decodes
twice as fast has half the service time and, at equal queues, half the work left: the queue
scorer then sends it twice the work. A target without a measured rate keeps its measured
end-to-end latency (`ModelState.request_service_s`), as does every target while no decode
length is known.

Pure functions of the telemetry: no clock, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import attrs

from infermesh.core.contracts import TargetView
from infermesh.core.model import ModelState, RequestFeatures

__all__ = [
    "FEATURES_BY_ID",
    "Speed",
    "StateFeatures",
    "decode_rate",
    "forget_features",
    "kv_permille",
    "median_tokens",
    "service_s",
    "state_features",
    "tokens_per_request",
]


@attrs.frozen
class Speed:
    """A target's measured decode rate and where it came from (for reasons)."""

    tokens_per_s: float
    """Tokens per second per running sequence."""
    source: str
    """`itl` or `generation rate`."""


def decode_rate(state: ModelState) -> Speed | None:
    """The target's measured per-sequence decode rate, or None when nothing measures it.

    Computed once per state (a ModelState is immutable and replaced on every change)."""
    # `state_features(state)`, its lookup inlined: the store filled it in when the delta landed.
    cached = FEATURES_BY_ID.get(id(state))
    if cached is not None and cached.state is state:
        return cached.speed
    return state_features(state).speed


class StateFeatures(NamedTuple):
    """What the scorers read of one state on every decision, computed once per state."""

    state: ModelState
    speed: Speed | None
    """`decode_rate(state)`."""
    decode_tokens: float | None
    """Generated tokens per request it measures (decode time at its decode rate), or None."""
    service_s: float
    """`state.request_service_s`."""


def state_features(state: ModelState) -> StateFeatures:
    """`state`'s StateFeatures: computed on the first call for this state object (the store
    calls it on every applied delta) and then looked up."""
    cached = FEATURES_BY_ID.get(id(state))
    if cached is not None and cached.state is state:
        return cached
    speed = _measure_rate(state)
    features = StateFeatures(
        state,
        speed,
        _decode_tokens(state, speed),
        state.request_service_s,
    )
    if len(FEATURES_BY_ID) >= FEATURES_BY_ID_SIZE:
        FEATURES_BY_ID.clear()
    FEATURES_BY_ID[id(state)] = features
    return features


def forget_features(state: ModelState | None) -> None:
    """Drop `state`'s entry (the store calls it when a delta replaces the state)."""
    if state is not None:
        cached = FEATURES_BY_ID.get(id(state))
        if cached is not None and cached.state is state:
            del FEATURES_BY_ID[id(state)]


def kv_permille(usage: float) -> int:
    """KV-cache usage (a fraction) in 0.1% steps, clamped to 0..1000; NaN (unknown) is 0."""
    usage = min(1.0, max(0.0, usage)) if usage == usage else 0.0
    return round(usage * 1000)


# id(ModelState) -> its features (the queue scorer reads it directly): the entry holds the
# state, so its id cannot be reused by another state while the entry lives; cleared whole when
# full (states not from a store).
FEATURES_BY_ID: dict[int, StateFeatures] = {}
FEATURES_BY_ID_SIZE = 1 << 15


def _measure_rate(state: ModelState) -> Speed | None:
    itl_s = state.itl_s
    if itl_s is not None and itl_s > 0 and math.isfinite(itl_s):
        return Speed(1.0 / itl_s, "itl")
    generated = state.generation_tokens_per_s
    if state.running >= 1 and generated > 0 and math.isfinite(generated):
        return Speed(generated / state.running, "generation rate")
    return None


def _decode_tokens(state: ModelState, speed: Speed | None) -> float | None:
    e2e_s, ttft_s = state.e2e_s, state.ttft_s
    if e2e_s is None or ttft_s is None or speed is None:
        return None
    tokens = (e2e_s - ttft_s) * speed.tokens_per_s
    return tokens if tokens >= 1 and math.isfinite(tokens) else None


def tokens_per_request(
    views: Sequence[TargetView],
    request: RequestFeatures,
    speeds: Sequence[Speed | None] | None = None,
) -> float | None:
    """Typical generated tokens per request of the candidates' model: the median over the
    targets that measure it, else the request's `max_output_tokens`, else None.

    `speeds`: each view's `decode_rate`, when the caller has them already."""
    if speeds is None:
        measured = sorted(
            t for t in (state_features(v.state).decode_tokens for v in views) if t is not None
        )
    else:
        measured = sorted(
            t
            for t in (_decode_tokens(v.state, sp) for v, sp in zip(views, speeds, strict=True))
            if t is not None
        )
    return median_tokens(measured, request)


def median_tokens(measured: list[float], request: RequestFeatures) -> float | None:
    """`tokens_per_request` from the sorted decode tokens of the targets that measure them."""
    if measured:
        middle = len(measured) // 2
        if len(measured) % 2:
            return measured[middle]
        return (measured[middle - 1] + measured[middle]) / 2.0
    if request.max_output_tokens > 0:
        return float(request.max_output_tokens)
    return None


def service_s(state: ModelState, tokens: float | None) -> tuple[float, Speed | None]:
    """Seconds one request takes on `state`'s target at its own measured speed, and the speed
    used (None: the end-to-end latency or its default was used)."""
    speed = decode_rate(state) if tokens is not None else None
    if speed is None or tokens is None:
        return state.request_service_s, None
    return tokens / speed.tokens_per_s, speed

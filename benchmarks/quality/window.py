"""Throughput during arrivals (`tok/s arr`): output tokens delivered while the trace was still
being sent, over that window.

The open-loop trace's req/s (completed requests over first send to last completion) is the
offered rate plus the last straggler's end-to-end time, so it differs between modes by a few %
that say nothing about throughput. `tok/s arr` counts the output tokens that reached the client
inside the arrival window [first send, last send] over the window's length: the rate the fleet
delivers under the offered load, which falls below the offered tokens/s when a mode falls
behind (its queues grow and its answers leave the window). The simulator's column of that name
is the same measure (docs/simulation.md).

Pure functions over the load generator's records. A streamed record's token times are exact:
the client timestamps every streamed chunk (`ttft_s`, then `itls_s`). A record without them (not
streamed) delivered all its tokens at its completion.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from infermesh.dev.loadgen import RequestRecord

__all__ = ["ArrivalWindow", "arrival_window", "tokens_within"]


@dataclass(frozen=True, slots=True)
class ArrivalWindow:
    """One trace's (or several traces' summed) arrival window and the tokens delivered in it."""

    window_s: float
    """First send to last send (summed over traces when pooled)."""
    tokens: float
    """Output tokens of successful requests that reached the client within the window."""
    gaps: int = 0
    """Sends after the first (sends - 1, summed when pooled): the window holds this many
    arrival gaps."""

    @property
    def tokens_per_s(self) -> float:
        """`tok/s arr`; NaN for an empty window (fewer than two sends)."""
        return self.tokens / self.window_s if self.window_s > 0 else float("nan")

    @property
    def sends_per_s(self) -> float:
        """The arrival rate the client achieved (gaps over the window): the trace's `--rate`
        give or take its Poisson draw, lower when the client falls behind its schedule."""
        return self.gaps / self.window_s if self.window_s > 0 else float("nan")

    def __add__(self, other: ArrivalWindow) -> ArrivalWindow:
        """Pooling: tokens summed over windows summed."""
        return ArrivalWindow(
            self.window_s + other.window_s, self.tokens + other.tokens, self.gaps + other.gaps
        )


def tokens_within(record: RequestRecord, end_s: float) -> float:
    """Output tokens of `record` that reached the client at or before `end_s` (the clock of
    `start_s`). A failed request counts none. Each streamed chunk carries
    completion_tokens / chunks tokens (one each from vLLM and the emulators)."""
    if not record.ok or record.completion_tokens <= 0:
        return 0.0
    if record.ttft_s is None:
        done = record.start_s + record.e2e_s
        return float(record.completion_tokens) if done <= end_s else 0.0
    first = record.start_s + record.ttft_s
    times = [first, *(first + t for t in itertools.accumulate(record.itls_s))]
    seen = sum(1 for at in times if at <= end_s)
    return record.completion_tokens * seen / len(times)


def arrival_window(records: Sequence[RequestRecord]) -> ArrivalWindow:
    """The trace's window [first send, last send] (every record: a failed request was sent
    too) and the successful requests' tokens delivered inside it."""
    if not records:
        return ArrivalWindow(0.0, 0.0)
    first = min(r.start_s for r in records)
    last = max(r.start_s for r in records)
    tokens = sum(tokens_within(r, last) for r in records)
    return ArrivalWindow(last - first, tokens, len(records) - 1)

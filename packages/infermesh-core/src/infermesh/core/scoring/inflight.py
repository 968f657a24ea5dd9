"""In-flight reservations and outcome feedback: what the routers did since the last scrape.

A reservation is an in-flight slot on one target, opened when a router is told to use it and
closed by the request's outcome (or expired after a TTL so a dead router cannot leak it). The
open reservations that started after a target's telemetry was read are the requests that
telemetry cannot show yet. Outcomes feed per-target TTFT and error-rate EWMAs.
Sans-I/O: every method takes `now`; never reads a clock, sleeps or logs.
"""

from __future__ import annotations

import bisect
import secrets
from collections import deque

import attrs

__all__ = ["InflightTracker", "OutcomeStats", "Reservation"]

DEFAULT_TTL_S = 600.0


@attrs.frozen
class Reservation:
    reservation_id: str
    target_id: str
    started_at: float
    seq: int


@attrs.define
class OutcomeStats:
    """Exponentially weighted feedback for one target from the routers' outcome reports."""

    ttft_ewma_s: float | None = None
    error_rate: float = 0.0
    outcomes: int = 0


def is_target_error(ok: bool, status: int) -> bool:
    """Whether an outcome counts against the target: connection failures, 5xx and 429 do;
    other 4xx are the client's fault and do not."""
    if ok:
        return False
    return not (400 <= status < 500 and status != 429)


class InflightTracker:
    """Open reservations per target (ordered by start time) and per-target outcome EWMAs."""

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        ewma_alpha: float = 0.2,
        id_prefix: str | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"reservation TTL must be positive, got {ttl_s}")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"outcome EWMA alpha must be in (0, 1], got {ewma_alpha}")
        self.ttl_s = ttl_s
        self.ewma_alpha = ewma_alpha
        # A per-process prefix keeps ids from a previous agent run from matching new ones.
        self._prefix = id_prefix if id_prefix is not None else secrets.token_hex(4)
        self._seq = 0
        self._open: dict[str, Reservation] = {}
        self._by_target: dict[str, list[tuple[float, int]]] = {}
        self._by_age: deque[Reservation] = deque()
        self._stats: dict[str, OutcomeStats] = {}
        self.expired_total = 0

    # ------------------------------------------------------------------ reservations

    def reserve(self, target_id: str, now: float) -> Reservation:
        self.expire(now)
        self._seq += 1
        reservation = Reservation(f"{self._prefix}-{self._seq}", target_id, now, self._seq)
        self._open[reservation.reservation_id] = reservation
        bisect.insort(self._by_target.setdefault(target_id, []), (now, self._seq))
        self._by_age.append(reservation)
        return reservation

    def release(self, reservation_id: str) -> Reservation | None:
        """Close a reservation; None when it is unknown, already closed or expired."""
        reservation = self._open.pop(reservation_id, None)
        if reservation is None:
            return None
        starts = self._by_target[reservation.target_id]
        entry = (reservation.started_at, reservation.seq)
        index = bisect.bisect_left(starts, entry)
        if index < len(starts) and starts[index] == entry:
            del starts[index]
        if not starts:
            del self._by_target[reservation.target_id]
        return reservation

    def expire(self, now: float) -> int:
        """Drop reservations older than the TTL; returns how many expired."""
        expired = 0
        horizon = now - self.ttl_s
        by_age = self._by_age
        while by_age and by_age[0].started_at < horizon:
            reservation = by_age.popleft()
            if self.release(reservation.reservation_id) is not None:
                expired += 1
        # Closed reservations stay in the age queue until they reach its front; trim them too
        # so the queue does not grow with the request rate.
        while by_age and by_age[0].reservation_id not in self._open:
            by_age.popleft()
        self.expired_total += expired
        return expired

    def in_flight(self, target_id: str, since: float) -> int:
        """Open reservations on `target_id` that started after `since` (the telemetry time)."""
        starts = self._by_target.get(target_id)
        if not starts:
            return 0
        return len(starts) - bisect.bisect_right(starts, (since, 1 << 62))

    def open_count(self, target_id: str | None = None) -> int:
        if target_id is None:
            return len(self._open)
        return len(self._by_target.get(target_id, ()))

    def get(self, reservation_id: str) -> Reservation | None:
        return self._open.get(reservation_id)

    # ------------------------------------------------------------------ outcomes

    def record_outcome(
        self, target_id: str, *, ok: bool, status: int, ttft_s: float | None
    ) -> None:
        """Fold one outcome into the target's EWMAs (the first sample seeds TTFT)."""
        stats = self._stats.get(target_id)
        if stats is None:
            stats = self._stats[target_id] = OutcomeStats()
        alpha = self.ewma_alpha
        error = 1.0 if is_target_error(ok, status) else 0.0
        stats.error_rate += alpha * (error - stats.error_rate)
        if ttft_s is not None and ttft_s >= 0.0:
            if stats.ttft_ewma_s is None:
                stats.ttft_ewma_s = ttft_s
            else:
                stats.ttft_ewma_s += alpha * (ttft_s - stats.ttft_ewma_s)
        stats.outcomes += 1

    def stats(self, target_id: str) -> OutcomeStats | None:
        return self._stats.get(target_id)

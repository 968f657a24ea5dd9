"""In-flight reservations and outcome feedback: what the routers did since the last scrape.

A reservation is an in-flight slot on one target, opened when a router is told to use it and
closed by the request's outcome (or expired after a TTL so a dead router cannot leak it).
Telemetry is up to one scrape old, and the tracker corrects it in both directions:

- `in_flight`: open reservations that started after the target's telemetry was read, the
  requests the runtime could not have counted yet (extra load);
- `open_before`: open reservations that started shortly before the telemetry was read; the
  runtime should count them, and any it does not are still on their way to it;
- `finished_unseen`: reservations that started before the telemetry was read and finished
  after it, requests the runtime counted that are gone now (load to take off). Each such
  correction ends by itself once telemetry read after the request finished arrives.

Outcomes also feed per-target TTFT and error-rate EWMAs.
Sans-I/O: every method takes its time as a parameter; never reads a clock, sleeps or logs.
"""

from __future__ import annotations

import bisect
import secrets
from collections import deque
from collections.abc import Sequence

import attrs

__all__ = [
    "NOTHING_TRACKED",
    "InflightTracker",
    "OutcomeStats",
    "Reservation",
    "is_target_error",
    "runtime_ran",
]

DEFAULT_TTL_S = 600.0
CLIENT_CLOSED = 499
"""The router's outcome status when the client disconnected mid-response (nginx's code)."""


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


@attrs.define
class _FinishedLog:
    """Start and finish times of one target's released reservations, each list sorted.

    Every entry starts no later than it finishes, so the entries that started at or before `t`
    and finished after it number `#(starts <= t) - #(finishes <= t)`: two bisections. The
    lists need not stay paired: entries that finished at or before `t` are pruned by dropping
    as many of the smallest values from both lists, which keeps the count right for every
    time from `t` on.
    """

    starts: list[float] = attrs.field(factory=list)
    finishes: list[float] = attrs.field(factory=list)

    def add(self, started_at: float, finished_at: float) -> None:
        bisect.insort(self.starts, started_at)
        bisect.insort(self.finishes, finished_at)

    def unseen_at(self, seen_at: float) -> int:
        """Entries that started at or before `seen_at` and finished after it; prunes the rest
        that finished at or before it (telemetry from `seen_at` on no longer counts them)."""
        finishes = self.finishes
        done = bisect.bisect_right(finishes, seen_at)
        if done:
            self.prune(done)
        return bisect.bisect_right(self.starts, seen_at)

    def prune_before(self, horizon: float) -> None:
        self.prune(bisect.bisect_left(self.finishes, horizon))

    def prune(self, count: int) -> None:
        del self.finishes[:count]
        del self.starts[:count]

    def __len__(self) -> int:
        return len(self.finishes)


def runtime_ran(status: int) -> bool:
    """Whether a request with this outcome status ran on the runtime, so that its telemetry
    counted it: a 2xx, or 499 (the client left mid-response). Other statuses were refused or
    failed before running (status 0: the runtime was never reached)."""
    return 200 <= status < 300 or status == CLIENT_CLOSED


NOTHING_TRACKED: tuple[int, int, int, float | None, float] = (0, 0, 0, None, 0.0)
"""`view_inputs` of a target the tracker holds nothing for (one shared tuple)."""
_NOTHING = NOTHING_TRACKED


class InflightTracker:
    """Open reservations per target (ordered by start time), released ones telemetry has not
    caught up with, and per-target outcome EWMAs."""

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
        self._finished: dict[str, _FinishedLog] = {}
        self._latest_s = float("-inf")
        self._sweep_at = float("-inf")
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

    def release(
        self, reservation_id: str, finished_at: float | None = None, *, ran: bool = True
    ) -> Reservation | None:
        """Close a reservation; None when it is unknown, already closed or expired.

        `finished_at` is when the request finished (the caller's clock, as for `reserve`);
        when omitted, the latest time this tracker was given stands in for it, which is never
        later than the truth and so can only shorten the correction. Pass `ran=False` when the
        runtime never ran the request (it failed before or at admission): there is then
        nothing for `finished_unseen` to take off.
        """
        reservation = self._close(reservation_id)
        if reservation is None or not ran:
            return reservation
        when = self._latest_s if finished_at is None else finished_at
        when = max(when, reservation.started_at)
        log = self._finished.get(reservation.target_id)
        if log is None:
            log = self._finished[reservation.target_id] = _FinishedLog()
        log.add(reservation.started_at, when)
        return reservation

    def release_outcome(
        self, reservation_id: str, now: float, *, status: int, latency_s: float = 0.0
    ) -> Reservation | None:
        """Close a reservation from its request's outcome, reported at `now`.

        Outcomes arrive batched, tens of milliseconds after the request finished, so the
        finish is dated the reservation's start plus the request's measured latency (never
        later than `now`; `now` itself when the latency is unknown, 0). Only a request the
        runtime ran (`runtime_ran(status)`) was counted by its telemetry.
        """
        reservation = self._open.get(reservation_id)
        if reservation is None:
            return None
        finished_at = now
        if latency_s > 0.0:
            finished_at = min(now, reservation.started_at + latency_s)
        return self.release(reservation_id, finished_at, ran=runtime_ran(status))

    def _close(self, reservation_id: str) -> Reservation | None:
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
        """Drop reservations older than the TTL; returns how many expired.

        Expired reservations never count as finished (nobody knows when they ended), and
        finished ones older than the TTL are forgotten even if no telemetry caught up with them.
        """
        if now > self._latest_s:
            self._latest_s = now
        expired = 0
        horizon = now - self.ttl_s
        by_age = self._by_age
        while by_age and by_age[0].started_at < horizon:
            reservation = by_age.popleft()
            if self._close(reservation.reservation_id) is not None:
                expired += 1
        finished = self._finished
        if finished and now >= self._sweep_at:
            # Usually telemetry prunes these; a sweep now and then catches targets gone quiet.
            self._sweep_at = now + self.ttl_s / 8.0
            for target_id, log in tuple(finished.items()):
                if log.finishes[0] < horizon:
                    log.prune_before(horizon)
                    if not log:
                        del finished[target_id]
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

    def open_before(self, target_id: str, since: float, window_s: float) -> int:
        """Open reservations on `target_id` that started in the `window_s` up to `since`.

        These requests were sent before the telemetry was read, so it should count them, yet
        a request reaches the runtime some time after its reservation (the router still has
        to forward it): when the telemetry shows fewer, the rest are still on their way. The
        window bounds how long a reservation whose outcome was lost can count this way.
        """
        starts = self._by_target.get(target_id)
        if not starts:
            return 0
        upper = bisect.bisect_right(starts, (since, 1 << 62))
        if not upper:
            return 0
        return upper - bisect.bisect_right(starts, (since - window_s, 1 << 62))

    def view_inputs(
        self, target_id: str, since: float, window_s: float
    ) -> tuple[int, int, int, float | None, float]:
        """What a scorer's view of `target_id` needs from this tracker, for telemetry read at
        `since`: `(in_flight, finished_unseen, open_before, ttft_ewma_s, error_rate)` in one
        call (the engine asks for every scored target); a target this tracker holds nothing
        for costs three dict lookups."""
        stats = self._stats.get(target_id)
        if target_id not in self._by_target and target_id not in self._finished:
            if stats is None:
                return _NOTHING
            return (0, 0, 0, stats.ttft_ewma_s, stats.error_rate)
        return (
            self.in_flight(target_id, since),
            self.finished_unseen(target_id, since),
            self.open_before(target_id, since, window_s),
            None if stats is None else stats.ttft_ewma_s,
            0.0 if stats is None else stats.error_rate,
        )

    def view_inputs_many(
        self, target_ids: Sequence[str], since: Sequence[float], window_s: float
    ) -> list[tuple[int, int, int, float | None, float]]:
        """`view_inputs` of each target (`since[i]`: when `target_ids[i]`'s telemetry was read),
        in order; with nothing tracked at all (no request sent or finished, no outcome) one
        shared answer for every target, without a lookup."""
        if not (self._stats or self._by_target or self._finished):
            return [_NOTHING] * len(target_ids)
        view_inputs = self.view_inputs
        return [
            view_inputs(target_id, seen_at, window_s)
            for target_id, seen_at in zip(target_ids, since, strict=True)
        ]

    def finished_unseen(self, target_id: str, since: float) -> int:
        """Released reservations on `target_id` that started at or before `since` (the
        telemetry time: the runtime counted them) and finished after it (they are gone now).

        `since` is expected not to go backwards for a target (the store only applies newer
        telemetry): entries that finished at or before it are forgotten here.
        """
        log = self._finished.get(target_id)
        if log is None:
            return 0
        unseen = log.unseen_at(since)
        if not log:
            del self._finished[target_id]
        return unseen

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

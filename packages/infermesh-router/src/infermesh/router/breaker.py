"""Per-target circuit breaking (outlier ejection) with half-open probing.

Each target is `closed` (used normally) until it fails `consecutive_failures` times in a row, or
`failure_rate` of its last `window` attempts (once `min_requests` are in) fail; it is then `open`
(ejected: the router sends it nothing) for `ejection_s`, doubled for each further ejection in a
row up to `max_ejection_s`. After that it is `half_open`: one probe request may go; its success
closes the breaker (and resets the back-off), its failure ejects the target again. Cancelled
attempts (a hedge's loser, a client that left) are not failures. Pure: the clock is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import attrs

from infermesh.core.config import BreakerConfig

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breakers"]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
MAX_TARGETS = 4096
"""Targets tracked; beyond it the breaker of a closed, idle target is forgotten first."""


@attrs.define
class _Target:
    state: str = CLOSED
    consecutive: int = 0
    recent: deque[bool] = attrs.field(factory=deque)
    """Outcomes of the last `window` attempts (True: failed)."""
    failed_in_window: int = 0
    open_until: float = 0.0
    ejections: int = 0
    """Ejections in a row (the back-off exponent); reset when a probe succeeds."""
    probing: bool = False


class Breakers:
    """The breakers of every target one router sends to; `on_transition(target, to_state)`."""

    def __init__(
        self,
        config: BreakerConfig,
        on_transition: Callable[[str, str], None] | None = None,
    ) -> None:
        self.config = config
        self._targets: dict[str, _Target] = {}
        self._on_transition = on_transition

    def state(self, target: str, now: float) -> str:
        """`closed`, `open` or `half_open` (an open breaker whose ejection is over)."""
        entry = self._targets.get(target)
        if entry is None:
            return CLOSED
        if entry.state == OPEN and now >= entry.open_until:
            self._move(target, entry, HALF_OPEN)
        return entry.state

    def available(self, target: str, now: float) -> bool:
        """Whether a request may be sent to `target` now (half-open: only while no probe runs)."""
        if not self.config.enabled:
            return True
        state = self.state(target, now)
        if state == CLOSED:
            return True
        if state == HALF_OPEN:
            return not self._targets[target].probing
        return False

    def acquire(self, target: str, now: float) -> None:
        """An attempt is sent to `target`; on a half-open target it is the probe."""
        entry = self._targets.get(target)
        if entry is not None and self.state(target, now) == HALF_OPEN:
            entry.probing = True

    def record(self, target: str, ok: bool, now: float) -> None:
        """An attempt on `target` ended: `ok` False for a failure of the target itself."""
        if not self.config.enabled:
            return
        entry = self._targets.get(target)
        if entry is None:
            entry = self._new(target)
        config = self.config
        state = self.state(target, now)
        entry.probing = False
        if state == HALF_OPEN:
            if ok:
                entry.ejections = 0
                self._reset(entry)
                self._move(target, entry, CLOSED)
            else:
                self._eject(target, entry, now)
            return
        if state == OPEN:
            return  # an attempt sent before the ejection ended; it decides nothing
        entry.recent.append(not ok)
        entry.failed_in_window += 0 if ok else 1
        if len(entry.recent) > config.window:
            entry.failed_in_window -= 1 if entry.recent.popleft() else 0
        entry.consecutive = 0 if ok else entry.consecutive + 1
        if ok:
            return
        total = len(entry.recent)
        if entry.consecutive >= config.consecutive_failures or (
            total >= config.min_requests and entry.failed_in_window >= config.failure_rate * total
        ):
            self._eject(target, entry, now)

    def release(self, target: str) -> None:
        """An attempt on `target` was cancelled: neither success nor failure (frees a probe)."""
        entry = self._targets.get(target)
        if entry is not None:
            entry.probing = False

    def _new(self, target: str) -> _Target:
        if len(self._targets) >= MAX_TARGETS:
            for name, old in list(self._targets.items()):
                if old.state == CLOSED:
                    del self._targets[name]
                    break
        entry = self._targets[target] = _Target()
        return entry

    def _eject(self, target: str, entry: _Target, now: float) -> None:
        config = self.config
        backoff = config.ejection_s * 2.0 ** min(entry.ejections, 30)
        entry.open_until = now + min(config.max_ejection_s, backoff)
        entry.ejections += 1
        self._reset(entry)
        self._move(target, entry, OPEN)

    @staticmethod
    def _reset(entry: _Target) -> None:
        entry.recent.clear()
        entry.failed_in_window = 0
        entry.consecutive = 0
        entry.probing = False

    def _move(self, target: str, entry: _Target, to_state: str) -> None:
        if entry.state == to_state and to_state != OPEN:
            return
        entry.state = to_state
        if self._on_transition is not None:
            self._on_transition(target, to_state)

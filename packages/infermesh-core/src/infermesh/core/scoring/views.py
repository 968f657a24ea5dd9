"""Building the scorers' `TargetView`s on the hot path.

A decision builds one view per scored target (up to `scoring.max_candidates`, 64 by default),
so the view's constructor is a measurable share of a decision. `make_view` gives exactly the
view `TargetView(...)` would (the same fields and derived values; a test compares every
field), at about half the cost: it sets the slots directly, and in the usual case (no request
finished or sent before the scrape) takes the derived running, waiting, unseen and load
straight from the state instead of running `TargetView.__attrs_post_init__`. Any other case
runs that method, so the correction rules live in one place (infermesh.core.contracts).
"""

from __future__ import annotations

from infermesh.core.contracts import TargetView
from infermesh.core.model import GpuState, ModelState

__all__ = ["make_view"]

_new = object.__new__
_post_init = TargetView.__attrs_post_init__
_SLOTS = TargetView.__dict__
# The slots' setters: attrs' frozen classes refuse `setattr`, their slot descriptors do not.
_set_state = _SLOTS["state"].__set__
_set_in_flight = _SLOTS["in_flight"].__set__
_set_gpus = _SLOTS["gpus"].__set__
_set_ttft = _SLOTS["ttft_ewma_s"].__set__
_set_error_rate = _SLOTS["error_rate"].__set__
_set_now = _SLOTS["now"].__set__
_set_finished = _SLOTS["finished_unseen"].__set__
_set_open_before = _SLOTS["open_before_scrape"].__set__
_set_rtt = _SLOTS["rtt_s"].__set__
_set_running = _SLOTS["running"].__set__
_set_waiting = _SLOTS["waiting"].__set__
_set_unseen = _SLOTS["unseen"].__set__
_set_load = _SLOTS["load"].__set__


def make_view(
    state: ModelState,
    in_flight: int,
    gpus: tuple[GpuState, ...],
    ttft_ewma_s: float | None,
    error_rate: float,
    now: float,
    finished_unseen: int,
    open_before_scrape: int,
    rtt_s: float | None,
) -> TargetView:
    """`TargetView(state, in_flight, gpus, ttft_ewma_s, error_rate, now, finished_unseen,
    open_before_scrape, rtt_s)`, built for the hot path."""
    view: TargetView = _new(TargetView)
    _set_state(view, state)
    _set_in_flight(view, in_flight)
    _set_gpus(view, gpus)
    _set_ttft(view, ttft_ewma_s)
    _set_error_rate(view, error_rate)
    _set_now(view, now)
    _set_finished(view, finished_unseen)
    _set_open_before(view, open_before_scrape)
    _set_rtt(view, rtt_s)
    running = state.running
    waiting = state.waiting
    if finished_unseen or open_before_scrape or not running + waiting >= 0.0:
        _post_init(view)  # corrections to apply (or odd telemetry): the one rulebook
        return view
    unseen = float(in_flight)
    _set_running(view, running)
    _set_waiting(view, waiting)
    _set_unseen(view, unseen)
    _set_load(view, running + waiting + unseen)
    return view

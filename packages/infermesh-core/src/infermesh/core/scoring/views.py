"""Building the scorers' `TargetView`s on the hot path.

A decision builds one view per scored target (up to `scoring.max_candidates`, 64 by default),
so the view's constructor is a measurable share of a decision. `make_view` gives exactly the
view `TargetView(...)` would (the same fields and derived values; a test compares every
field), at about half the cost: it sets the slots directly, and in the usual case (no request
finished or sent before the scrape) takes the derived running, waiting, unseen and load
straight from the state instead of running `TargetView.__attrs_post_init__`. Any other case
runs that method, so the correction rules live in one place (infermesh.core.contracts).

Most scored targets are never returned (the router asks for 3 of 64), and the built-in scorers
read only a few floats of each, so the engine does not build a view per scored target at all: it
hands the scorers a `ViewTable`, a `Sequence[TargetView]` that keeps the scored targets as
columns (states, target ids, corrected loads, ...) and builds a target's view, with
`make_view`, only when something reads it (a third-party scorer, a returned target, a reason).
The built-in scorers read the columns through `table_of`, which also wraps a plain list of
views (a scorer called directly, as in tests), so each scorer has one code path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from infermesh.core.contracts import TargetView
from infermesh.core.model import GpuState, ModelState
from infermesh.core.scoring.capacity import FEATURES_BY_ID, StateFeatures, state_features
from infermesh.core.scoring.inflight import NOTHING_TRACKED
from infermesh.core.scoring.rows import CandidateRow, candidate_row, row_field

__all__ = ["ViewTable", "make_view", "table_of"]

_Tracked = tuple[int, int, int, float | None, float]
"""`InflightTracker.view_inputs` of one target."""
_NOTHING: _Tracked = NOTHING_TRACKED
_STATE = row_field("state")
_FEATURES = row_field("features")
_LOAD = row_field("load")

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


class ViewTable(Sequence[TargetView]):
    """One decision's scored targets: columns the built-in scorers read, views built on demand.

    Indexing or iterating gives the same `TargetView` objects a list of `make_view`s would
    (each built once, on first read). The columns, one entry per target in order:

    - `states`, `ids` (target ids), `now` (the decision's time, shared);
    - `loads` and `unseen`: `TargetView.load` and `TargetView.unseen` (corrected for what the
      routers did since the scrape);
    - `finished_unseen`, `gpus`, `rtts`: the views' fields of those names, built when read;
    - `features`: each state's `capacity.StateFeatures` (decode rate, decode tokens, service
      time), looked up once per decision however many scorers read them.
    """

    __slots__ = (
        "_features",
        "_gpus",
        "_rows",
        "_rtts",
        "_tracked",
        "_views",
        "ids",
        "loads",
        "now",
        "states",
        "unseen",
    )

    def __init__(self, now: float) -> None:
        self.now = now
        self.states: list[ModelState] = []
        self.ids: list[str] = []
        self.loads: list[float] = []
        self.unseen: list[float] = []
        # Per target: the in-flight tracker's `view_inputs` (in_flight, finished_unseen,
        # open_before_scrape, ttft_ewma_s, error_rate), its GPUs and its RTT.
        self._tracked: list[_Tracked] = []
        self._gpus: list[tuple[GpuState, ...]] = []
        self._rtts: list[float | None] = []
        self._views: dict[int, TargetView] = {}
        # Filled by `of_rows` (the engine's table); computed on first read otherwise.
        self._features: list[StateFeatures] | None = None
        self._rows: list[CandidateRow] | None = None

    def add(
        self,
        state: ModelState,
        target_id: str,
        in_flight: int,
        gpus: tuple[GpuState, ...],
        ttft_ewma_s: float | None,
        error_rate: float,
        finished_unseen: int,
        open_before_scrape: int,
        rtt_s: float | None,
    ) -> None:
        """Append one target (`make_view`'s arguments); its view is built when first read."""
        if self._features is not None:
            self._features.append(state_features(state))
        if self._rows is not None:
            self._rows.append(candidate_row(state))
        self._append(
            state,
            target_id,
            state.running + state.waiting,
            (in_flight, finished_unseen, open_before_scrape, ttft_ewma_s, error_rate),
            gpus,
            rtt_s,
        )

    @classmethod
    def of_rows(
        cls,
        now: float,
        rows: list[CandidateRow],
        ids: list[str],
        tracked: list[_Tracked],
        gpus: list[tuple[GpuState, ...]],
        rtts: list[float | None],
    ) -> ViewTable:
        """The engine's table: the store's `rows` of the scored targets, with each one's id,
        in-flight tracker `view_inputs` (`tracked`), GPUs and RTT."""
        table = cls(now)
        table._rows = rows
        table.states = list(map(_STATE, rows))
        table.ids = ids
        table._features = list(map(_FEATURES, rows))
        table._tracked = tracked
        table._gpus = gpus
        table._rtts = rtts
        running_waiting: list[float] = list(map(_LOAD, rows))
        count = len(rows)
        if (
            count
            and tracked.count(_NOTHING) == count
            and min(running_waiting) >= 0.0
            and sum(running_waiting) >= 0.0  # NaN fails this (min may skip it)
        ):
            # Nothing in flight or finished since the scrapes, and sane telemetry: every view
            # takes the scraped running + waiting as it is (`make_view`'s usual case).
            table.loads = [load + 0.0 for load in running_waiting]
            table.unseen = [0.0] * count
            return table
        loads = table.loads
        unseen = table.unseen
        for index, (load, inputs) in enumerate(zip(running_waiting, tracked, strict=True)):
            if inputs[1] or inputs[2] or not load >= 0.0:
                # Corrections to apply (or odd telemetry): the view's rulebook derives them.
                view = table._views[index] = table._make(index)
                loads.append(view.load)
                unseen.append(view.unseen)
            else:
                # `make_view`'s usual case: scraped running + waiting plus the in-flight ones.
                in_flight = float(inputs[0])
                loads.append(load + in_flight)
                unseen.append(in_flight)
        return table

    def _append(
        self,
        state: ModelState,
        target_id: str,
        running_waiting: float,
        tracked: _Tracked,
        gpus: tuple[GpuState, ...],
        rtt_s: float | None,
    ) -> None:
        index = len(self.states)
        self.states.append(state)
        self.ids.append(target_id)
        self._tracked.append(tracked)
        self._gpus.append(gpus)
        self._rtts.append(rtt_s)
        in_flight, finished_unseen, open_before_scrape = tracked[0], tracked[1], tracked[2]
        if finished_unseen or open_before_scrape or not running_waiting >= 0.0:
            # Corrections to apply (or odd telemetry): the view's rulebook derives the values.
            view = self._views[index] = self._make(index)
            self.loads.append(view.load)
            self.unseen.append(view.unseen)
            return
        # `make_view`'s usual case: the state's running and waiting plus the in-flight ones.
        unseen = float(in_flight)
        self.loads.append(running_waiting + unseen)
        self.unseen.append(unseen)

    def _make(self, index: int) -> TargetView:
        in_flight, finished_unseen, open_before_scrape, ttft_ewma_s, error_rate = self._tracked[
            index
        ]
        return make_view(
            self.states[index],
            in_flight,
            self._gpus[index],
            ttft_ewma_s,
            error_rate,
            self.now,
            finished_unseen,
            open_before_scrape,
            self._rtts[index],
        )

    @classmethod
    def of_views(cls, views: Sequence[TargetView]) -> ViewTable:
        """A table over views built elsewhere (their own loads, corrections and times)."""
        table = cls(views[0].now if views else 0.0)
        for index, view in enumerate(views):
            table.states.append(view.state)
            table.ids.append(view.state.key.target_id)
            table.loads.append(view.load)
            table.unseen.append(view.unseen)
            table._tracked.append(
                (
                    view.in_flight,
                    view.finished_unseen,
                    view.open_before_scrape,
                    view.ttft_ewma_s,
                    view.error_rate,
                )
            )
            table._gpus.append(view.gpus)
            table._rtts.append(view.rtt_s)
            table._views[index] = view
        return table

    def subset(self, indices: Sequence[int]) -> ViewTable:
        """The rows at `indices`, in that order (views already built are shared)."""
        table = ViewTable(self.now)
        table.states = [self.states[i] for i in indices]
        table.ids = [self.ids[i] for i in indices]
        table.loads = [self.loads[i] for i in indices]
        table.unseen = [self.unseen[i] for i in indices]
        table._tracked = [self._tracked[i] for i in indices]
        table._gpus = [self._gpus[i] for i in indices]
        table._rtts = [self._rtts[i] for i in indices]
        views = self._views
        table._views = {row: views[i] for row, i in enumerate(indices) if i in views}
        if self._features is not None:
            features = self._features
            table._features = [features[i] for i in indices]
        if self._rows is not None:
            rows = self._rows
            table._rows = [rows[i] for i in indices]
        return table

    @property
    def rows(self) -> list[CandidateRow]:
        """Each state's `rows.CandidateRow` (the store's, for the engine's table)."""
        rows = self._rows
        if rows is None:
            rows = self._rows = [candidate_row(state) for state in self.states]
        return rows

    @property
    def finished_unseen(self) -> list[int]:
        return [tracked[1] for tracked in self._tracked]

    @property
    def gpus(self) -> list[tuple[GpuState, ...]]:
        return self._gpus

    @property
    def rtts(self) -> list[float | None]:
        return self._rtts

    def now_of(self, index: int) -> float:
        """`self[index].now` without building the view."""
        view = self._views.get(index)
        return self.now if view is None else view.now

    @property
    def features(self) -> list[StateFeatures]:
        """Each state's scoring features (computed by the store when its delta landed)."""
        features = self._features
        if features is None:
            features = self._features = []
            cached = FEATURES_BY_ID.get
            for state in self.states:
                # `state_features(state)`, its lookup inlined (the store filled it in).
                entry = cached(id(state))
                features.append(
                    entry if entry is not None and entry.state is state else state_features(state)
                )
        return features

    def __len__(self) -> int:
        return len(self.states)

    @overload
    def __getitem__(self, index: int) -> TargetView: ...

    @overload
    def __getitem__(self, index: slice) -> list[TargetView]: ...

    def __getitem__(self, index: int | slice) -> TargetView | list[TargetView]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self.states)))]
        if index < 0:
            index += len(self.states)
            if index < 0:
                raise IndexError("ViewTable index out of range")
        view = self._views.get(index)
        if view is None:
            view = self._views[index] = self._make(index)
        return view

    def __iter__(self) -> Iterator[TargetView]:
        for index in range(len(self.states)):
            yield self[index]


def table_of(targets: Sequence[TargetView]) -> ViewTable:
    """`targets` as a ViewTable: the engine's own table, or one over a plain list of views."""
    if isinstance(targets, ViewTable):
        return targets
    return ViewTable.of_views(targets)

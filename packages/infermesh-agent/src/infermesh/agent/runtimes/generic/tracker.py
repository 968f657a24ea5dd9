"""The state machine between scrapes and deltas for a mapped runtime.

Fed `(outcome of one scrape, now)`, it returns the ModelStateDeltas to emit and whether a problem
started or ended (so the shell logs each problem once). Sans-I/O: never fetches, sleeps or logs.
A page it cannot read keeps the last good values, marked unhealthy with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from infermesh.agent.runtimes.generic.mapping import MetricMapping
from infermesh.agent.runtimes.generic.page import (
    GenericPageError,
    PageReading,
    model_health,
    read_models,
    read_page,
    server_health,
)
from infermesh.agent.runtimes.generic.states import build_states
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey

__all__ = ["FetchFailed", "GenericTracker", "Observation", "PageFetched", "ScrapeOutcome"]


@attrs.frozen
class PageFetched:
    """The endpoints answered: the metrics text, the model list body (None when the models
    come from config or the page), and the health answers as (status, body) per model, or
    under `""` for the server's health path."""

    metrics_text: str
    models_body: bytes | None
    health: Mapping[str, tuple[int, bytes]]


@attrs.frozen
class FetchFailed:
    """The runtime could not be scraped; `reason` names the URL and what to check."""

    reason: str


ScrapeOutcome = PageFetched | FetchFailed


@attrs.frozen
class Observation:
    """What one scrape changed: deltas to emit, and a problem that began (or ended) with it."""

    deltas: tuple[ModelStateDelta, ...] = ()
    problem_started: str = ""
    recovered: bool = False


class GenericTracker:
    """Current states of one mapped runtime's targets, with a version that grows on every change.

    `models` are the names from config (`options.models`); when empty they come from the
    mapping's model source. `first_version` should grow across restarts (the shell seeds it
    from the clock).
    """

    def __init__(
        self,
        *,
        mapping: MetricMapping,
        node: str,
        endpoint: str,
        models: Sequence[str] = (),
        max_num_seqs: int | None = None,
        first_version: int = 1,
    ) -> None:
        self.mapping = mapping
        self.node = node
        self.endpoint = endpoint
        self.models = tuple(models)
        self.max_num_seqs = max_num_seqs
        self._next_version = first_version
        self._states: dict[TargetKey, ModelState] = {}
        self._previous: PageReading | None = None
        self._problem = ""

    @property
    def states(self) -> Mapping[TargetKey, ModelState]:
        return dict(self._states)

    @property
    def problem(self) -> str:
        """Why the runtime is unusable now, or empty."""
        return self._problem

    def observe(self, outcome: ScrapeOutcome, now: float) -> Observation:
        if isinstance(outcome, FetchFailed):
            return self._failed(outcome.reason)
        try:
            reading = read_page(outcome.metrics_text, self.mapping, now)
            models = self._models(outcome, reading)
        except GenericPageError as exc:
            return self._failed(
                f"cannot read {self.endpoint}{exc.path}: {exc}; check that the runtime's url is "
                f"the {self.mapping.title} server's base URL (mapping: {self.mapping.source})"
            )
        health = self._health(outcome.health)
        new_states = build_states(
            mapping=self.mapping,
            node=self.node,
            endpoint=self.endpoint,
            models=models,
            reading=reading,
            previous=self._previous,
            health=health,
            fixed_max_num_seqs=self.max_num_seqs,
            now=now,
        )
        self._previous = reading
        for key, old in self._states.items():
            if key not in new_states:  # no longer listed
                new_states[key] = attrs.evolve(old, loaded=False, last_updated=now)
        unhealthy = sorted({s.health_reason for s in new_states.values() if not s.healthy})
        return self._transition("; ".join(unhealthy), self._commit(new_states))

    def _models(self, outcome: PageFetched, reading: PageReading) -> tuple[str, ...]:
        if self.models:
            return self.models
        source = self.mapping.models_source
        if source == "metrics":
            return tuple(sorted(name for name in reading.models if name))
        if outcome.models_body is None:
            raise GenericPageError(
                "no model names: set options.models in the [[runtimes]] table", "(config)"
            )
        return read_models(outcome.models_body, source, self.mapping.models_path)

    def _health(self, answers: Mapping[str, tuple[int, bytes]]) -> dict[str, tuple[bool, str]]:
        title = self.mapping.title
        health: dict[str, tuple[bool, str]] = {}
        for model, (status, body) in answers.items():
            if model:
                health[model] = model_health(title, model, status, body)
            else:
                health[model] = server_health(title, self.mapping.health_path, status)
        return health

    def _failed(self, reason: str) -> Observation:
        # The values are kept (they are the last known) but the target must not be routed to;
        # last_updated is not advanced, so the target also turns stale.
        marked = {
            key: attrs.evolve(state, healthy=False, health_reason=reason)
            for key, state in self._states.items()
        }
        return self._transition(reason, self._commit(marked))

    def _transition(self, problem: str, deltas: tuple[ModelStateDelta, ...]) -> Observation:
        started = problem if problem and not self._problem else ""
        recovered = bool(self._problem) and not problem
        self._problem = problem
        return Observation(deltas=deltas, problem_started=started, recovered=recovered)

    def _commit(self, new_states: Mapping[TargetKey, ModelState]) -> tuple[ModelStateDelta, ...]:
        deltas = []
        for key, new in new_states.items():
            old = self._states.get(key)
            if old is not None and attrs.evolve(new, version=old.version) == old:
                continue
            versioned = attrs.evolve(new, version=self._next_version)
            self._next_version += 1
            deltas.append((old or ModelState(key=key)).delta_to(versioned))
            self._states[key] = versioned
        return tuple(deltas)

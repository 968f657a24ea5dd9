"""The state machine between scrapes and deltas: versions, vanished models, health transitions.

Fed `(outcome of one scrape, now)`, it returns the ModelStateDeltas to emit and whether a problem
started or ended (so the shell logs each problem once). Sans-I/O: never fetches, sleeps or logs.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.vllm.parse import MetricsReading, VllmPageError, parse_scrape

__all__ = ["FetchFailed", "Observation", "PageFetched", "ScrapeOutcome", "TargetTracker"]


@attrs.frozen
class PageFetched:
    """All three endpoints answered: the /metrics text, the /v1/models body, the /health status."""

    metrics_text: str
    models_json: str | bytes
    health_status: int


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
    """Non-empty when the runtime just became unusable: the reason, to be logged once."""
    recovered: bool = False
    """True when the runtime is usable again after a problem."""


class TargetTracker:
    """Current states of one vLLM server's targets, with a version that grows on every change.

    `first_version` should grow across restarts (the shell seeds it from the clock) so that a
    peer holding states from before a restart does not discard the new ones as stale.
    """

    def __init__(self, *, node: str, endpoint: str, first_version: int = 1) -> None:
        self.node = node
        self.endpoint = endpoint
        self._next_version = first_version
        self._states: dict[TargetKey, ModelState] = {}
        self._previous: MetricsReading | None = None
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
            parsed = parse_scrape(
                metrics_text=outcome.metrics_text,
                models_json=outcome.models_json,
                health_status=outcome.health_status,
                previous=self._previous,
                now=now,
                node=self.node,
                endpoint=self.endpoint,
            )
        except VllmPageError as exc:
            return self._failed(
                f"cannot read {self.endpoint}{exc.path}: {exc}; "
                "check that the URL points at a vLLM OpenAI-compatible server"
            )
        self._previous = parsed.snapshot
        new_states = dict(parsed.states)
        for key, old in self._states.items():
            if key not in new_states:  # no longer listed by /v1/models
                new_states[key] = attrs.evolve(old, loaded=False, last_updated=now)
        unhealthy = sorted({s.health_reason for s in new_states.values() if not s.healthy})
        return self._transition("; ".join(unhealthy), self._commit(new_states))

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

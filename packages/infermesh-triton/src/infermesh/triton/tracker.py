"""The state machine between Triton scrapes and deltas: versions, vanished models, health changes.

Fed `(outcome of one scrape, now)`, it returns the ModelStateDeltas to emit and whether a problem
started or ended (so the shell logs each problem once), and keeps the latest per model/version
estimates. Sans-I/O: never fetches, sleeps or logs.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.triton.metrics import MetricsReading, TritonPageError, read_metrics
from infermesh.triton.parse import (
    Estimate,
    build_states,
    estimate,
    health_from_status,
    read_index,
)

__all__ = ["FetchFailed", "Observation", "PageFetched", "ScrapeOutcome", "TargetTracker"]


@attrs.frozen
class PageFetched:
    """Every endpoint answered: metrics text, repository index body, `/v2/health/ready` status."""

    metrics_text: str
    index_json: str | bytes
    ready_status: int


@attrs.frozen
class FetchFailed:
    """The server could not be scraped; `reason` names the URL and what to check."""

    reason: str


ScrapeOutcome = PageFetched | FetchFailed


@attrs.frozen
class Observation:
    """What one scrape changed: deltas to emit, and a problem that began (or ended) with it."""

    deltas: tuple[ModelStateDelta, ...] = ()
    problem_started: str = ""
    """Non-empty when the server just became unusable: the reason, to be logged once."""
    recovered: bool = False


class TargetTracker:
    """Current states of one Triton server's models, with a version that grows on each change.

    `first_version` should grow across restarts (the shell seeds it from the clock) so that a
    peer holding states from before a restart does not discard the new ones as stale.
    """

    def __init__(
        self,
        *,
        node: str,
        endpoint: str,
        metrics_url: str,
        index_url: str,
        custom_labels: Mapping[str, str] | None = None,
        first_version: int = 1,
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        self.metrics_url = metrics_url
        self.index_url = index_url
        self.custom_labels = dict(custom_labels or {})
        self._next_version = first_version
        self._states: dict[TargetKey, ModelState] = {}
        self._previous: MetricsReading | None = None
        self._estimates: dict[tuple[str, str], Estimate] = {}
        self._problem = ""

    @property
    def states(self) -> Mapping[TargetKey, ModelState]:
        return dict(self._states)

    @property
    def estimates(self) -> Mapping[tuple[str, str], Estimate]:
        """Per (model, version): service rate and latencies over the last scrape interval."""
        return dict(self._estimates)

    @property
    def reading(self) -> MetricsReading | None:
        """The last metrics page read (GPU gauges included)."""
        return self._previous

    @property
    def problem(self) -> str:
        return self._problem

    def observe(self, outcome: ScrapeOutcome, now: float) -> Observation:
        if isinstance(outcome, FetchFailed):
            return self._failed(outcome.reason)
        try:
            reading = read_metrics(outcome.metrics_text, now, self.metrics_url)
            index = read_index(outcome.index_json, self.index_url)
        except TritonPageError as exc:
            return self._failed(f"cannot read {exc.url}: {exc}")
        ready = sorted({e.name for e in index if e.state == "READY"})
        if ready and not reading.versions:
            return self._failed(
                f"cannot read {self.metrics_url}: no nv_inference_* series although models "
                f"{', '.join(ready)} are READY; is options.metrics_url Triton's metrics port "
                "(8002), and is Triton started with --allow-metrics=true?"
            )
        previous = self._previous
        new_states = build_states(
            node=self.node,
            endpoint=self.endpoint,
            reading=reading,
            previous=previous,
            index=index,
            ready_status=outcome.ready_status,
            now=now,
            custom_labels=self.custom_labels,
        )
        elapsed_s = now - previous.taken_at if previous is not None else 0.0
        self._estimates = {
            key: estimate(current, previous.versions.get(key) if previous else None, elapsed_s)
            for key, current in reading.versions.items()
        }
        self._previous = reading
        for key, old in self._states.items():
            if key not in new_states:  # no longer in the repository index at all
                new_states[key] = attrs.evolve(old, loaded=False, last_updated=now)
        # A model unloaded on purpose is not a problem of the server; a server not ready is.
        _, problem = health_from_status(outcome.ready_status)
        return self._transition(problem, self._commit(new_states))

    def _failed(self, reason: str) -> Observation:
        # The values are kept (the last known) but the targets must not be routed to;
        # last_updated is not advanced, so they also turn stale.
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

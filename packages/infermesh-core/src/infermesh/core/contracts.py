"""The typed objects a plugin hands to InferMesh: adapters, scorers and transports.

These are Protocols and small value classes only. The host (agent or router) owns every
lifecycle and all I/O scheduling; a plugin object never starts threads or servers of its own.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from infermesh.core.model import (
    GpuState,
    GpuStateDelta,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)

__all__ = [
    "AdapterContext",
    "GpuAdapter",
    "GpuAdapterFactory",
    "PerTargetScorer",
    "RuntimeAdapter",
    "RuntimeAdapterFactory",
    "RuntimeControl",
    "ScoreResult",
    "Scorer",
    "TargetView",
    "Transport",
    "TransportContext",
    "TransportFactory",
    "UpstreamError",
    "UpstreamResponse",
]


# --------------------------------------------------------------------------- runtime / GPU adapters


@attrs.frozen
class AdapterContext:
    """What the agent gives an adapter factory: where the source is and how to treat it.

    `url` is the source's base URL (for vLLM, the OpenAI server's base URL; for dcgm-exporter,
    its /metrics URL). `options` holds the adapter-specific keys of the `[[runtimes]]` or
    `[[gpus]]` config table, unparsed, so an adapter validates its own options.
    """

    node: str
    name: str
    url: str
    poll_interval_s: float = 1.0
    timeout_s: float = 2.0
    options: Mapping[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class RuntimeAdapter(Protocol):
    """Watches one inference runtime and streams what changes about the models it serves.

    `deltas()` runs until the host cancels it. It must never raise for a bad scrape: a page it
    cannot parse or a runtime that is down becomes a delta with `healthy=False` and a
    `health_reason` an operator can act on. A model that disappears becomes `loaded=False`.
    """

    def deltas(self) -> AsyncIterator[ModelStateDelta]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class RuntimeControl(Protocol):
    """Lifecycle operations on a runtime, for adapters whose runtime supports them."""

    async def load(self, model: str, source: str) -> None:
        """Load `model` (for vLLM: a LoRA adapter named `model` from path `source`)."""

    async def unload(self, model: str) -> None: ...

    async def warm(self, model: str) -> None:
        """Send a minimal request so the first real request does not pay for cold caches."""


RuntimeAdapterFactory = Callable[[AdapterContext], RuntimeAdapter]


@runtime_checkable
class GpuAdapter(Protocol):
    """Watches the GPUs of this node and streams what changes about each of them."""

    def deltas(self) -> AsyncIterator[GpuStateDelta]: ...

    async def aclose(self) -> None: ...


GpuAdapterFactory = Callable[[AdapterContext], GpuAdapter]


# --------------------------------------------------------------------------- scorers


@attrs.frozen
class TargetView:
    """A scorer's read-only view of one candidate target at decision time.

    Telemetry is up to one scrape interval old; the routers' reservations and outcome reports
    correct it in both directions:

    - `in_flight`: requests sent to this target after the telemetry was read (it cannot show
      them yet);
    - `open_before_scrape`: requests sent shortly before the telemetry was read and not
      finished; the runtime should count them, and those it does not are still on their way;
    - `finished_unseen`: requests the telemetry still counts that have finished since.

    `running`, `waiting`, `unseen`, `load` and `expected_work_left_s` apply these corrections:
    read them rather than `state.running` / `state.waiting`. `ttft_ewma_s` and `error_rate`
    come from outcome reports. `rtt_s` is the estimated network round trip from the deciding
    node to the target's node (Vivaldi coordinates); None when unknown or local.
    """

    state: ModelState
    in_flight: int = 0
    gpus: tuple[GpuState, ...] = ()
    ttft_ewma_s: float | None = None
    error_rate: float = 0.0
    now: float = 0.0
    finished_unseen: int = 0
    open_before_scrape: int = 0
    rtt_s: float | None = None

    running: float = attrs.field(init=False)
    """Running requests, less those that finished since the scrape beyond the queue."""
    waiting: float = attrs.field(init=False)
    """Queued requests, less those that finished since the scrape.

    While a runtime has a queue, a finished request's slot goes to a queued one, so what
    finished comes off the queue first and off `running` only once the queue is empty."""
    unseen: float = attrs.field(init=False)
    """Requests on their way that the telemetry does not show: `in_flight`, plus those sent
    before the scrape beyond what it counts (corrected running + waiting)."""
    load: float = attrs.field(init=False)
    """Requests on the target now, as best known: running + waiting + unseen."""

    def __attrs_post_init__(self) -> None:
        # Derived once here: scorers read them for every target on every request.
        state = self.state
        running, waiting = state.running, state.waiting
        finished = self.finished_unseen
        if finished > 0:
            if finished <= waiting:
                waiting -= finished
            else:
                running = max(0.0, running - (finished - max(waiting, 0.0)))
                waiting = 0.0
        unseen = float(self.in_flight)
        missing = self.open_before_scrape - running - waiting
        if missing > 0:
            unseen += missing
        setattr_ = object.__setattr__
        setattr_(self, "running", running)
        setattr_(self, "waiting", waiting)
        setattr_(self, "unseen", unseen)
        setattr_(self, "load", running + waiting + unseen)

    @property
    def key(self) -> TargetKey:
        return self.state.key

    @property
    def expected_work_left_s(self) -> float:
        """`work_left_s` corrected for what the scrape has not seen: unseen requests count as
        queued, and requests that finished since the scrape no longer count."""
        state = self.state
        if self.finished_unseen <= 0:
            return state.work_left_with_s(extra_queued=self.unseen)
        # ModelState.work_left_with_s's formula over the corrected running and waiting.
        running = self.running
        outstanding = self.waiting + self.unseen + 0.5 * running
        return outstanding * state.request_service_s / max(running, 1.0)


class ScoreResult:
    """One scorer's opinion of one target: a score in [0, 1] (1 is best) and why.

    An immutable value compared by (score, reason). `ScoreResult(score, reason)` takes the
    reason as text; a scorer on the hot path can use `ScoreResult.deferred` instead, so that
    the text is only formatted when someone reads `reason` (most rankings are never explained).
    """

    # A deferred result leaves `_reason` unset until it is first read.
    __slots__ = ("_lazy", "_reason", "score")
    __match_args__ = ("score", "reason")

    score: float
    _reason: str
    _lazy: tuple[Callable[..., str], tuple[Any, ...]]

    def __init__(self, score: float, reason: str) -> None:
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score} outside [0, 1] ({reason})")
        _set_slot(self, "score", score)
        _set_slot(self, "_reason", reason)

    @classmethod
    def deferred(cls, score: float, formatter: Callable[..., str], *args: Any) -> ScoreResult:
        """A result whose reason is `formatter(*args)`, computed on the first read of `reason`.

        `formatter` must be pure and `args` must not change afterwards (pass immutable values),
        so the reason reads the same whenever it is formatted.
        """
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score {score} outside [0, 1] ({formatter(*args)})")
        self = _new_object(cls)
        _set_slot(self, "score", score)
        _set_slot(self, "_lazy", (formatter, args))
        return self

    @property
    def reason(self) -> str:
        try:
            return self._reason
        except AttributeError:
            formatter, args = self._lazy
            reason = formatter(*args)
            _set_slot(self, "_reason", reason)
            return reason

    def __setattr__(self, name: str, value: object) -> None:
        raise attrs.exceptions.FrozenInstanceError()

    def __delattr__(self, name: str) -> None:
        raise attrs.exceptions.FrozenInstanceError()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, ScoreResult)
        return self.score == other.score and self.reason == other.reason

    def __hash__(self) -> int:
        return hash((self.score, self.reason))

    def __repr__(self) -> str:
        return f"ScoreResult(score={self.score!r}, reason={self.reason!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, (self.score, self.reason))


_set_slot = object.__setattr__
_new_object = object.__new__


@runtime_checkable
class Scorer(Protocol):
    """Rates every candidate target for one request.

    Scorers see all candidates at once so that relative scorers (prefix affinity, least-loaded)
    can be written; `score` must return one result per target, in the same order, and must be
    pure and fast (it runs on every request). `default_weight` applies unless policy sets one.
    """

    # Read-only properties so that frozen attrs classes and plain class attributes both conform.
    @property
    def name(self) -> str: ...

    @property
    def default_weight(self) -> float: ...

    def score(
        self, request: RequestFeatures, targets: Sequence[TargetView]
    ) -> Sequence[ScoreResult]: ...


class PerTargetScorer(abc.ABC):
    """Base class for scorers that rate each target on its own: implement `score_one`."""

    name: str = ""
    default_weight: float = 1.0

    @abc.abstractmethod
    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult: ...

    def score(
        self, request: RequestFeatures, targets: Sequence[TargetView]
    ) -> Sequence[ScoreResult]:
        return [self.score_one(request, target) for target in targets]


# --------------------------------------------------------------------------- transports


@attrs.frozen
class TransportContext:
    """What the router gives a transport factory."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    max_connections: int = 1024


class UpstreamResponse(Protocol):
    """A response whose headers have arrived and whose body is still streaming."""

    status: int
    headers: Sequence[tuple[str, str]]

    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive from the runtime, never re-buffered."""

    async def read(self) -> bytes: ...

    def release(self) -> None:
        """Return the connection to the pool (or drop it if the body was not read to the end)."""


@runtime_checkable
class Transport(Protocol):
    """How the router speaks to a runtime (OpenAI HTTP, KServe v2 HTTP, ...)."""

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> UpstreamResponse:
        """Send a request; return once response headers arrive. Raises `UpstreamError`."""

    async def aclose(self) -> None: ...


TransportFactory = Callable[[TransportContext], Transport]


class UpstreamError(Exception):
    """The runtime could not be reached or failed before sending response headers."""

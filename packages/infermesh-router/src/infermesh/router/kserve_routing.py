"""Choosing Triton targets for KServe v2 calls: score, try ranked targets, report every attempt.

Shared by the HTTP and gRPC ingress: the model named in the call is the KServe model, ranked by
the same scoring as OpenAI requests, restricted to targets whose transport is `kserve-http`.
Inference calls pass the router's admission gate first (SLO class queues, saturation shedding,
tenant quotas: admission.md), exactly as OpenAI requests do; a refusal is `Refusal.OVERLOADED`
with the gate's Retry-After. Attempts move to the next target only while nothing has been
relayed; every attempt's outcome releases its reservation and is reported to the agent. Knows no
wire format; never relays bytes.
"""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import attrs

from infermesh.core.logging import get_logger
from infermesh.core.model import RequestFeatures, SloClass
from infermesh.core.proto import scoring_pb2
from infermesh.router.agent_client import AgentUnavailable
from infermesh.router.decision import Choice, Decision, RouteScoring
from infermesh.router.errors import ApiError
from infermesh.router.forward import AttemptFailed

__all__ = [
    "KSERVE_TRANSPORT",
    "Admit",
    "AttemptFailed",
    "KServeAttempt",
    "KServeError",
    "KServeRouting",
    "Refusal",
]

log = get_logger(__name__)

KSERVE_TRANSPORT = "kserve-http"
"""The transport a target's runtime must have for KServe v2 calls to be sent to it."""

T = TypeVar("T")

Admit = Callable[[RequestFeatures], AbstractAsyncContextManager[object]]
"""The admission gate's `admit`: holds a slot for the block, raises ApiError(429) instead."""


class Refusal(enum.Enum):
    """Why the router answers a KServe call itself; each ingress maps it to a status."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    UNAVAILABLE = "unavailable"
    UPSTREAM_FAILED = "upstream_failed"
    OVERLOADED = "overloaded"
    """Admission refused the call (class queue full or timed out, fleet saturated, tenant quota):
    HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED."""


class KServeError(Exception):
    """A KServe call the router answers itself: `kind` says why, the message what to do."""

    def __init__(self, kind: Refusal, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s


@attrs.define
class KServeAttempt:
    """One try on one Triton target; the ingress fills in how it went."""

    target: Choice
    reservation_id: str
    started: float
    ok: bool = False
    status: int = 0
    """HTTP status seen (gRPC calls map their status code to one); 0: no answer."""
    error: str = ""


def features_for(
    model: str, request_id: str, slo_header: str | None, tenant_header: str | None
) -> RequestFeatures:
    """The routing features of a KServe call; a bad SLO header is a `BAD_REQUEST`."""
    try:
        slo_class = SloClass.parse(slo_header)
    except ValueError as exc:
        raise KServeError(Refusal.BAD_REQUEST, f"invalid x-infermesh-slo: {exc}") from None
    return RequestFeatures(
        model=model, slo_class=slo_class, tenant=tenant_header or "", request_id=request_id
    )


class KServeRouting:
    """Runs a KServe call on the best Triton target that answers (see the module docstring)."""

    def __init__(
        self,
        scoring: RouteScoring,
        report: Callable[[scoring_pb2.Outcome], None],
        *,
        max_attempts: int = 2,
        retry_after_s: float = 1.0,
        admit: Admit | None = None,
    ) -> None:
        self.scoring = scoring
        self.admit = admit
        self._report = report
        self.max_attempts = max_attempts
        self.retry_after_s = retry_after_s

    async def ready(self) -> tuple[bool, str]:
        """Server readiness: the agent's state is usable and some model is loaded somewhere."""
        serving, reason = await self.scoring.health()
        if not serving:
            return False, reason
        try:
            names = await self.scoring.model_names()
        except AgentUnavailable as exc:
            return False, str(exc)
        if not names:
            return False, "no runtime in the mesh has a model loaded"
        return True, ""

    async def plan(self, features: RequestFeatures) -> Decision:
        """The ranked Triton targets for `features.model`, or the `KServeError` to answer."""
        model = features.model
        try:
            decision = await self.scoring.score(features, self.max_attempts)
        except AgentUnavailable as exc:
            raise KServeError(Refusal.UNAVAILABLE, str(exc), self.retry_after_s) from None
        if not decision.model_known:
            raise KServeError(
                Refusal.NOT_FOUND, f"model {model!r} is not served by any runtime in this mesh"
            )
        choices = tuple(c for c in decision.choices if c.transport == KSERVE_TRANSPORT)
        if len(choices) != len(decision.choices):
            # A reservation was taken on the first choice: give it back.
            self._release(decision, features)
        if decision.choices and not choices:
            others = sorted({c.transport for c in decision.choices})
            raise KServeError(
                Refusal.NOT_FOUND,
                f"model {model!r} is served only by runtimes without the {KSERVE_TRANSPORT!r} "
                f"transport ({', '.join(others)}); set transport = {KSERVE_TRANSPORT!r} in the "
                "[[runtimes]] table of its Triton server",
            )
        if not choices:
            excluded = "; ".join(decision.excluded[:5]) or "none reported"
            raise KServeError(
                Refusal.UNAVAILABLE,
                f"no healthy target can serve model {model!r} right now "
                f"({decision.candidates} candidate(s); excluded: {excluded})",
                decision.retry_after_s or self.retry_after_s,
            )
        reservation = decision.reservation_id if choices[0] == decision.choices[0] else ""
        return decision._replace(choices=choices, reservation_id=reservation)

    async def run(
        self,
        features: RequestFeatures,
        attempt_on: Callable[[KServeAttempt], Awaitable[T]],
        *,
        admitted: bool = False,
    ) -> T:
        """`attempt_on` each ranked target until one returns; it raises `AttemptFailed` to move
        on (only before anything was relayed). Raises `KServeError` when none answered.

        With `admitted` (inference calls) the call holds an admission slot for its duration;
        a refusal raises `KServeError(Refusal.OVERLOADED)` before any target is scored."""
        if not admitted or self.admit is None:
            return await self._run(features, attempt_on)
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.admit(features))
            except ApiError as refused:
                raise KServeError(
                    Refusal.OVERLOADED, refused.message, refused.retry_after_s
                ) from None
            return await self._run(features, attempt_on)
        raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows

    async def _run(
        self, features: RequestFeatures, attempt_on: Callable[[KServeAttempt], Awaitable[T]]
    ) -> T:
        decision = await self.plan(features)
        failures: list[str] = []
        for index, choice in enumerate(decision.choices[: self.max_attempts]):
            reservation_id = decision.reservation_id
            if index > 0 or not reservation_id:
                try:
                    admitted = await self.scoring.admit(features, choice)
                except AgentUnavailable as exc:
                    failures.append(f"{choice.target_id}: {exc}")
                    break
                if admitted.reservation_id is None:
                    failures.append(f"{choice.target_id}: not admitted ({admitted.reason})")
                    continue
                reservation_id = admitted.reservation_id
            attempt = KServeAttempt(choice, reservation_id, time.perf_counter())
            try:
                return await attempt_on(attempt)
            except AttemptFailed as exc:
                attempt.ok, attempt.error = False, str(exc)
                failures.append(f"{choice.target_id}: {exc}")
                log.warning(
                    "kserve attempt failed",
                    request_id=features.request_id,
                    target=choice.target_id,
                    error=str(exc),
                )
            finally:
                self.finish(attempt, features)
        raise KServeError(
            Refusal.UPSTREAM_FAILED,
            f"no Triton target answered the call for model {features.model!r}: "
            + " | ".join(failures),
        )

    def finish(self, attempt: KServeAttempt, features: RequestFeatures) -> None:
        """Release the attempt's reservation and queue its outcome for the agent."""
        outcome = scoring_pb2.Outcome(
            reservation_id=attempt.reservation_id,
            target_id=attempt.target.target_id,
            request_id=features.request_id,
            ok=attempt.ok,
            status=attempt.status,
            error=attempt.error,
            latency_s=time.perf_counter() - attempt.started,
        )
        self.scoring.finished(outcome)
        self._report(outcome)

    def _release(self, decision: Decision, features: RequestFeatures) -> None:
        if not decision.reservation_id or not decision.choices:
            return
        first = decision.choices[0]
        if first.transport == KSERVE_TRANSPORT:
            return
        outcome = scoring_pb2.Outcome(
            reservation_id=decision.reservation_id,
            target_id=first.target_id,
            request_id=features.request_id,
            ok=True,
            error="not a KServe target; not sent",
        )
        self.scoring.finished(outcome)
        self._report(outcome)

"""Keeps the router's local engine on the agent's operator policy, polled every second.

One background task: asks the agent's State.GetPolicy, and when the revision differs from the
one applied, parses the document and hands the `PolicySet` to a callback (LocalScoring gives it
to its engine). An agent without the call (an older one) or a failing call leaves the policy as
it was (empty, for an agent that never answered); a document that does not parse keeps the last
good policy. Each kind of failure is logged once; polling goes on with backoff. Never touches a
request, and never ends on an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import grpc

from infermesh.core.logging import get_logger
from infermesh.core.policy import PolicySet
from infermesh.core.proto import state_pb2
from infermesh.router.agent_poll import AgentPoller

__all__ = ["PolicyWatcher"]

log = get_logger(__name__)

POLL_INTERVAL_S = 1.0
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 2.0


class PolicyWatcher(AgentPoller):
    """The background task between the agent's GetPolicy and `apply` (called with each new
    policy, on the event loop). `policy` is the last one applied (empty until the agent gives
    one). Shares the agent connection the way `RttWatcher` does."""

    what = "policy poll"

    def __init__(
        self,
        target: str,
        apply: Callable[[PolicySet], None],
        *,
        interval_s: float = POLL_INTERVAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        super().__init__(
            target, interval_s=interval_s, backoff_max_s=backoff_max_s, timeout_s=timeout_s
        )
        self.apply = apply
        self.policy = PolicySet()
        self._seen_revision: int | None = None
        self._failing: str | None = None

    async def _poll(self, stub: Any) -> bool:
        """One GetPolicy call; whether it answered."""
        self.polls += 1
        try:
            reply: state_pb2.PolicySnapshot = await stub.GetPolicy(
                state_pb2.ListRequest(), timeout=self.timeout_s
            )
        except Exception as exc:  # whatever went wrong, the task must live on and retry
            self.failures += 1
            self._failed(exc)
            return False
        if self._failing is not None:
            log.info("agent policy available", agent=self.target, revision=reply.revision)
            self._failing = None
        self.received(reply.revision, reply.json)
        return True

    def received(self, revision: int, document: str) -> None:
        """Apply the policy `document` (JSON) at `revision` unless that revision was seen."""
        if revision == self._seen_revision:
            return
        self._seen_revision = revision  # a bad document is warned about once, not every poll
        try:
            policy = PolicySet.from_document(json.loads(document))
        except Exception as exc:  # a malformed document must not stop routing
            log.warning(
                "agent sent a policy the router cannot read; keeping the last good one",
                agent=self.target,
                revision=revision,
                kept_revision=self.policy.revision,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        self.policy = policy
        self.apply(policy)
        log.info(
            "policy applied", agent=self.target, revision=policy.revision, drains=len(policy.drains)
        )

    def _failed(self, exc: Exception) -> None:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        kind = code.name if code is not None else type(exc).__name__
        if kind == self._failing:
            return
        self._failing = kind
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info(
                "agent does not serve GetPolicy (an older agent); local ranking keeps the "
                "policy it has (none, unless an earlier agent gave one)",
                agent=self.target,
            )
        else:
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.debug(
                "agent did not answer GetPolicy; keeping the last policy",
                agent=self.target,
                error=f"{kind}: {detail}",
            )

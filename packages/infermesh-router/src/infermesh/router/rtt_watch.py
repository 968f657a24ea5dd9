"""Keeps a `NodeRtts` filled from the agent's ListNodeRtts, polled every couple of seconds.

One background task: asks the agent for its gossip mesh's RTT estimates, swaps them into the
holder the local engine reads, sleeps, asks again. An agent without the call (an older one) or a
failing call leaves the estimates as they were (none, for an agent that never answered; the
engine then treats every node as local); the task logs once per kind of failure and keeps polling
with backoff. Never touches a request, and never ends on an error.
"""

from __future__ import annotations

from typing import Any

import grpc

from infermesh.core.logging import get_logger
from infermesh.core.proto import state_pb2
from infermesh.router.agent_poll import AgentPoller
from infermesh.router.replica import NodeRtts

__all__ = ["RttWatcher"]

log = get_logger(__name__)

POLL_INTERVAL_S = 2.0
BACKOFF_MAX_S = 30.0
TIMEOUT_S = 2.0


class RttWatcher(AgentPoller):
    """The background task between the agent's ListNodeRtts and a `NodeRtts`.

    It opens its own channel to `target` with the AgentClient's channel options, so gRPC can
    share the one connection to the agent (its subchannel pool is keyed by target and options).
    """

    what = "RTT poll"

    def __init__(
        self,
        target: str,
        rtts: NodeRtts,
        *,
        interval_s: float = POLL_INTERVAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        super().__init__(
            target, interval_s=interval_s, backoff_max_s=backoff_max_s, timeout_s=timeout_s
        )
        self.rtts = rtts
        self._failing: str | None = None
        self._warned_malformed = False

    async def _poll(self, stub: Any) -> bool:
        """One ListNodeRtts call; whether it answered."""
        self.polls += 1
        try:
            reply: state_pb2.NodeRttList = await stub.ListNodeRtts(
                state_pb2.ListRequest(), timeout=self.timeout_s
            )
        except Exception as exc:  # whatever went wrong, the task must live on and retry
            self.failures += 1
            self._failed(exc)
            return False
        skipped = self.rtts.replace((entry.node, entry.rtt_s) for entry in reply.rtts)
        if skipped and not self._warned_malformed:
            self._warned_malformed = True
            log.warning(
                "agent listed malformed node RTTs; skipping them",
                agent=self.target,
                skipped=skipped,
            )
        if self._failing is not None:
            log.info("agent RTT estimates available", agent=self.target, nodes=len(self.rtts))
            self._failing = None
        return True

    def _failed(self, exc: Exception) -> None:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            # An agent without the call (an older version, or one just swapped for it) has no
            # estimates to give: what it listed before no longer describes its node.
            self.rtts.clear()
        kind = code.name if code is not None else type(exc).__name__
        if kind == self._failing:
            return
        self._failing = kind
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info(
                "agent does not serve ListNodeRtts (an older agent); local ranking sees no "
                "network RTTs, so net_penalty treats every node as local",
                agent=self.target,
            )
        else:
            # The state watch already warns when the agent is away; this is detail.
            detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.debug(
                "agent did not answer ListNodeRtts; keeping the last estimates",
                agent=self.target,
                error=f"{kind}: {detail}",
            )

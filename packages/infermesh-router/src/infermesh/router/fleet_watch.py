"""Agent scoring mode: the replicas' states for admission's saturation check, polled every second.

One background task asks the agent's State.ListModelStates and keeps the states by served model
(base model and loaded adapters), so that `router.scoring = "agent"` can shed by saturation as
local mode does, on a view at most one poll old. Until the first answer it knows nothing (no
shedding); a failing poll keeps the last view. Never touches a request and never ends on an error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from infermesh.core.convert import model_state_from_pb
from infermesh.core.model import ModelState
from infermesh.core.proto import state_pb2
from infermesh.router.agent_poll import AgentPoller

__all__ = ["FleetWatcher"]

POLL_INTERVAL_S = 1.0
BACKOFF_MAX_S = 30.0


class FleetWatcher(AgentPoller):
    """`fleet(model)`: the model's replicas as last polled; None before the first answer."""

    what = "fleet poll"

    def __init__(
        self,
        target: str,
        *,
        interval_s: float = POLL_INTERVAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        timeout_s: float = 2.0,
    ) -> None:
        super().__init__(
            target, interval_s=interval_s, backoff_max_s=backoff_max_s, timeout_s=timeout_s
        )
        self._by_model: dict[str, tuple[ModelState, ...]] | None = None

    def fleet(self, model: str) -> Sequence[ModelState] | None:
        if self._by_model is None:
            return None
        return self._by_model.get(model, ())

    async def _poll(self, stub: Any) -> bool:
        self.polls += 1
        try:
            reply: state_pb2.ModelStateList = await stub.ListModelStates(
                state_pb2.ListRequest(), timeout=self.timeout_s
            )
        except Exception:  # whatever went wrong, keep the last view and poll again
            self.failures += 1
            return False
        self.received([model_state_from_pb(state) for state in reply.states])
        return True

    def received(self, states: Sequence[ModelState]) -> None:
        """Replace the view with these states."""
        by_model: defaultdict[str, list[ModelState]] = defaultdict(list)
        for state in states:
            for name in {state.key.model, *state.adapters}:
                by_model[name].append(state)
        self._by_model = {name: tuple(members) for name, members in by_model.items()}

"""What a scoring mode tells the forwarder: ranked choices, a reservation, and why none.

The values the `Forwarder` works with whichever mode ranks the targets (`local`: in this process;
`agent`: ScoreTargets on the agent), and the `RouteScoring` protocol both modes implement. Values
and a protocol only: nothing here does I/O.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from infermesh.core.model import RequestFeatures
from infermesh.core.proto import scoring_pb2
from infermesh.router.agent_client import AgentClient
from infermesh.router.metrics import RouterMetrics

__all__ = ["DEFAULT_TRANSPORT", "Admission", "Choice", "Decision", "RouteScoring"]

DEFAULT_TRANSPORT = "openai-http"
"""The transport of a target that neither labels one nor has a `[[runtimes]]` entry here."""


class Choice(NamedTuple):
    """One ranked target: where to send the request and through which transport plugin."""

    target_id: str
    endpoint: str
    """The runtime's base URL, e.g. `http://127.0.0.1:8001`."""
    transport: str
    """The target's `transport` label, else the local `[[runtimes]]` entry for `endpoint`."""
    grpc_target: str = ""
    """The Triton server's KServe gRPC `host:port` (its `kserve_grpc` label; '' if unknown)."""


class Decision(NamedTuple):
    """The ranking for one request: `choices` best first, with a reservation on the first."""

    model_known: bool
    choices: tuple[Choice, ...]
    reservation_id: str = ""
    candidates: int = 0
    """Targets serving the model before filtering."""
    excluded: tuple[str, ...] = ()
    """`target_id: why` for each filtered-out target."""
    retry_after_s: float = 0.0
    """When `choices` is empty for a known model: when to try again (0: no hint)."""


class Admission(NamedTuple):
    """A reservation on a lower-ranked target, or why it was refused."""

    reservation_id: str | None
    reason: str = ""


class RouteScoring(Protocol):
    """Ranks targets for requests and learns how each attempt went.

    `score` and `admit` raise `AgentUnavailable` when the mode cannot decide at all (the agent is
    unreachable, or the router has no state from it yet). `start`/`aclose` run inside the
    serving loop, after the agent client is started and before it is closed.
    """

    mode: str
    """`local` or `agent`, as in `router.scoring`."""
    agent: AgentClient
    """The agent's client: outcome reports go through it in every mode."""
    outcome_linger_s: float
    """How long outcome reports gather into one batch before they are sent to the agent."""

    def attach_metrics(self, metrics: RouterMetrics) -> None:
        """Export the mode's own metrics (called once, by the app)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def score(self, features: RequestFeatures, max_targets: int) -> Decision: ...

    async def admit(self, features: RequestFeatures, choice: Choice) -> Admission: ...

    def finished(self, outcome: scoring_pb2.Outcome) -> None:
        """An attempt is over (never blocks or raises; reporting it is the forwarder's job)."""

    async def model_names(self) -> list[str]:
        """Sorted names of the models some target has loaded."""

    async def health(self) -> tuple[bool, str]:
        """(ready, reason) for `GET /health`."""

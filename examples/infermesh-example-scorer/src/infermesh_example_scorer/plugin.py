"""A third-party scorer: prefer targets whose endpoint is on an operator-given list.

Operators list preferred runtime endpoints (for example the replicas on reserved capacity) in
`INFERMESH_PREFERRED_ENDPOINTS` (comma-separated base URLs) and give the scorer a weight in
`[scoring.weights]`, e.g. `preferred-endpoint = 5`. It never does I/O while scoring.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from infermesh.core import hookimpl
from infermesh.core.contracts import PerTargetScorer, ScoreResult, TargetView
from infermesh.core.hookspecs import RegisterScorer
from infermesh.core.model import RequestFeatures

ENV_PREFERRED = "INFERMESH_PREFERRED_ENDPOINTS"


class PreferredEndpointScorer(PerTargetScorer):
    """1.0 for a preferred endpoint, 0.0 otherwise."""

    name = "preferred-endpoint"
    default_weight = 1.0

    def __init__(self, preferred: Sequence[str]) -> None:
        self.preferred = frozenset(url.rstrip("/") for url in preferred if url.strip())

    def score_one(self, request: RequestFeatures, target: TargetView) -> ScoreResult:
        endpoint = target.key.endpoint.rstrip("/")
        if endpoint in self.preferred:
            return ScoreResult(1.0, f"{endpoint} is a preferred endpoint")
        return ScoreResult(0.0, f"{endpoint} is not preferred")


@hookimpl
def infermesh_register_scorers(register: RegisterScorer) -> None:
    preferred = os.environ.get(ENV_PREFERRED, "").split(",")
    register(PreferredEndpointScorer(preferred))

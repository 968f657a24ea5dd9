"""Column scorers: a scorer's scores as plain floats, its results built only when asked for.

A decision scores up to `scoring.max_candidates` targets but returns only `max_targets` of them
(the router asks for 3), so building a `ScoreResult` for every scored target is mostly wasted.
A scorer that subclasses `ColumnScorer` hands the engine a `ScoreColumn` instead: the scores in
target order, and a function that builds the `ScoreResult` of one target (reason deferred as
usual). The engine ranks on the floats and builds the results of the returned targets only.

`ColumnScorer.score` is still the plain `Scorer` protocol (one result per target, identical to
what the engine reports), so such a scorer is used and tested like any other. A subclass that
overrides `score` is treated as a plain scorer.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import NamedTuple

from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import RequestFeatures

__all__ = ["ColumnScorer", "ScoreColumn", "column_of", "constant_column", "results_column"]


class ScoreColumn(NamedTuple):
    """One scorer's opinion of every scored target."""

    scores: Sequence[float]
    """The score of each target, in the order of the targets, each in [0, 1]."""
    result: Callable[[int], ScoreResult]
    """The `ScoreResult` of the target at an index (its score is `scores[index]`)."""


class ColumnScorer(abc.ABC):
    """Base class for scorers that hand the engine their scores as a column."""

    name: str = ""
    default_weight: float = 1.0

    @abc.abstractmethod
    def score_column(self, request: RequestFeatures, targets: Sequence[TargetView]) -> ScoreColumn:
        """Score every target; `ScoreColumn.result(i)` must equal what `score` gives for it."""

    def score(
        self, request: RequestFeatures, targets: Sequence[TargetView]
    ) -> Sequence[ScoreResult]:
        column = self.score_column(request, targets)
        return [column.result(i) for i in range(len(targets))]


def results_column(results: Sequence[ScoreResult]) -> ScoreColumn:
    """The column of a plain scorer's results."""
    return ScoreColumn([r.score for r in results], results.__getitem__)


def constant_column(result: ScoreResult, count: int) -> ScoreColumn:
    """`count` targets that all get `result` (e.g. no RTT or GPU telemetry for any of them)."""
    return ScoreColumn([result.score] * count, lambda _: result)


def column_of(
    scorer: object,
) -> Callable[[RequestFeatures, Sequence[TargetView]], ScoreColumn] | None:
    """`scorer.score_column` when the scorer is a column scorer whose `score` is the column
    one (not overridden), else None."""
    if isinstance(scorer, ColumnScorer) and type(scorer).score is ColumnScorer.score:
        return scorer.score_column
    return None

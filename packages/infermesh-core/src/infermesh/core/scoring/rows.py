"""One row per candidate target: what a decision reads of it, computed when its delta lands.

A decision scores up to `scoring.max_candidates` targets of a model; at 10,000 replicas those
are scattered over memory, and reading each one's state, labels, key and scoring features cost
more (cache misses) than the arithmetic. The store keeps, per model, the candidates' rows in
candidate order, patched in place when a target's state changes (a new list only when the
model's membership changes), so a decision reads one small tuple per scored target: the usual
"can it serve?" check is one precomputed boolean and a staleness comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import itemgetter
from typing import Any, Final, NamedTuple

from infermesh.core.model import ModelState
from infermesh.core.scoring.capacity import StateFeatures, kv_permille, state_features

__all__ = ["LAST_UPDATED_AT", "PLAIN_AT", "CandidateRow", "candidate_row", "row_field"]


class CandidateRow(NamedTuple):
    """One target as a decision reads it (a tuple: unpacked on the hot path)."""

    state: ModelState
    target_id: str
    node: str
    features: StateFeatures
    """`capacity.state_features(state)`."""
    plain: bool
    """Loaded, warm, healthy and without a `gpu_uuid` label: it can serve unless its telemetry
    is stale or a filter or the operator policy rules it out (the engine checks those)."""
    last_updated: float
    load: float
    """Scraped running + waiting."""
    kv_permille: int
    """`capacity.kv_permille(state.kv_cache_usage)`: KV-cache usage in 0.1% steps."""
    idle_work_s: float
    """`state.work_left_with_s(0.0)`: its work left when nothing is in flight or finished
    since the scrape (the queue scorer's usual case)."""


PLAIN_AT: Final = 4
"""The position of `CandidateRow.plain` (an index is cheaper than the name on the hot path)."""
LAST_UPDATED_AT: Final = 5
"""The position of `CandidateRow.last_updated`."""


def candidate_row(state: ModelState) -> CandidateRow:
    """The row of `state` (computes its scoring features when they are not known yet)."""
    features = state_features(state)
    return CandidateRow(
        state,
        state.key.target_id,
        state.key.node,
        features,
        state.loaded and not state.warming and state.healthy and not state.labels.gpu_uuid,
        state.last_updated,
        state.running + state.waiting,
        kv_permille(state.kv_cache_usage),
        state.work_left_with_s(0.0),
    )


def row_field(field: str) -> Callable[[CandidateRow], Any]:
    """A C-speed reader of one field, for `map` over many rows (`list(map(row_field("load"),
    rows))`): a plain tuple index, cheaper than the field's name on the hot path."""
    fields = CandidateRow._fields
    if field not in fields:
        raise ValueError(f"CandidateRow has no field {field!r}; its fields: {', '.join(fields)}")
    return itemgetter(fields.index(field))

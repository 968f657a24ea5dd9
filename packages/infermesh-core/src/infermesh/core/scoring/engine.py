"""The scoring engine: filter a model's candidates, rate them with weighted scorers, rank them.

Sans-I/O and clock-injected (`rank(request, now)`), so the simulator runs the same code with
virtual time. It reads the store's per-model candidate list (never the whole cluster) and the
in-flight tracker; it never awaits, logs or writes state.

Operator policy (`set_policy`) takes effect on the next `rank`: targets on drained nodes and, for a
pinned model, on nodes outside the pin are filtered out with a reason; the most specific scoring
policy for the request's model and SLO class re-weights the scorers and adds its filters. Requests
already in flight are not touched: a drain only stops new ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from operator import add, mul
from typing import NamedTuple, Protocol, runtime_checkable

import attrs

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import Scorer, ScoreResult, TargetView
from infermesh.core.model import (
    GpuState,
    ModelState,
    RequestFeatures,
    TargetKey,
    finite_or_none,
)
from infermesh.core.policy import Drain, PolicySet, ScoringPolicy
from infermesh.core.scoring.columns import ScoreColumn, column_of, results_column
from infermesh.core.scoring.gpu_health import gpu_exclusion_reason
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.prefix import LearningScorer
from infermesh.core.scoring.rows import LAST_UPDATED_AT, PLAIN_AT, CandidateRow, row_field
from infermesh.core.scoring.sampling import CandidateSampler
from infermesh.core.scoring.state import StateStore
from infermesh.core.scoring.views import ViewTable

__all__ = [
    "ConfigurableScorer",
    "Exclusion",
    "RankedTarget",
    "Ranking",
    "RttEstimate",
    "ScoreReason",
    "ScoringEngine",
    "ScoringSetupError",
    "WeightedScorer",
    "resolve_scorers",
]

# Retry-After hints when a known model has no usable target.
RETRY_TRANSIENT_S = 1.0
"""Some target is only stale or warming up: it is likely back within a scrape or two."""
RETRY_UNAVAILABLE_S = 5.0
"""Every target is unhealthy, unloaded or filtered out by labels."""
# Labels that are read from the target's key rather than its Labels.
_KEY_FILTERS = frozenset({"model", "node", "endpoint"})
# Candidate tuples whose target ids the engine keeps (one per model, as the store hands out).
_IDS_CACHE_SIZE = 1024

_EMPTY_POLICY = PolicySet()
_TARGET_ID = row_field("target_id")
_LAST_UPDATED = row_field("last_updated")


class _RequestPolicy(NamedTuple):
    """The parts of the policy that apply to one request, looked up once per ranking."""

    drains: Mapping[str, Drain]
    pinned: tuple[str, ...] | None
    """The model's pinned nodes, or None when it is not pinned."""
    scoring: ScoringPolicy | None


RttEstimate = Callable[[str], float | None]
"""Estimated network round trip in seconds from this node to a node id; None when unknown."""


class ScoringSetupError(Exception):
    """The scoring configuration cannot work (unknown scorer name, bad weight, ...)."""


@runtime_checkable
class ConfigurableScorer(Protocol):
    """A scorer that takes tunables from `[scoring]`: the agent calls `configured` once."""

    def configured(self, scoring: ScoringConfig) -> Scorer: ...


@attrs.frozen
class WeightedScorer:
    name: str
    scorer: Scorer
    weight: float


class ScoreReason(NamedTuple):
    """One scorer's contribution to a target's total (a tuple: cheap on the hot path)."""

    scorer: str
    score: float
    weight: float
    reason: str


class RankedTarget(NamedTuple):
    """One ranked target: its total and each scorer's result (a tuple: cheap on the hot path)."""

    target_id: str
    view: TargetView
    score: float
    """Weighted mean of the scorers' scores, 0..1."""
    results: tuple[ScoreResult, ...]
    """One result per scorer, in the order of `scorers`."""
    scorers: tuple[WeightedScorer, ...]

    @property
    def state(self) -> ModelState:
        return self.view.state

    @property
    def reasons(self) -> tuple[ScoreReason, ...]:
        """Each scorer's score, weight and reason for this target."""
        return tuple(
            ScoreReason(ws.name, result.score, ws.weight, result.reason)
            for ws, result in zip(self.scorers, self.results, strict=True)
        )


@attrs.frozen
class Exclusion:
    target_id: str
    why: str
    transient: bool = False
    """Likely to clear within a scrape or two (stale telemetry, warming up)."""

    def __str__(self) -> str:
        return f"{self.target_id}: {self.why}"


@attrs.frozen
class Ranking:
    targets: tuple[RankedTarget, ...]
    model_known: bool
    candidates: int
    """Targets serving the model before filtering."""
    excluded: tuple[Exclusion, ...] = ()
    retry_after_s: float = 0.0
    """When `targets` is empty for a known model: when to try again."""


def _best_first(totals: Sequence[float], ids: Sequence[str], max_targets: int) -> list[int]:
    """The indices of the best `max_targets` totals (all when 0), best first, ties by id.

    The cut-off total comes from a plain float sort; only the targets at or above it are
    ordered by (total, id)."""
    count = len(totals)
    if 0 < max_targets < count:
        cut = sorted(totals, reverse=True)[max_targets - 1]
        picked = [i for i, total in enumerate(totals) if total >= cut]
    else:
        picked = list(range(count))
    picked.sort(key=lambda i: (-totals[i], ids[i]))
    if 0 < max_targets < len(picked):
        del picked[max_targets:]
    return picked


def resolve_scorers(
    registered: Mapping[str, Scorer], scoring: ScoringConfig
) -> tuple[WeightedScorer, ...]:
    """Apply `[scoring]` to the registered scorers: weights, tunables, validation.

    Raises ScoringSetupError naming the offending key; scorers with weight 0 are left out.
    """
    known = ", ".join(sorted(registered)) or "(none)"
    unknown = sorted(set(scoring.weights) - set(registered))
    if unknown:
        raise ScoringSetupError(
            f"scoring.weights names unknown scorer(s) {', '.join(map(repr, unknown))}; "
            f"registered scorers: {known}"
        )
    if not (scoring.stale_after_s > 0 and math.isfinite(scoring.stale_after_s)):
        raise ScoringSetupError(f"scoring.stale_after_s must be > 0, got {scoring.stale_after_s}")
    if not scoring.prefix_load_factor >= 1.0:
        raise ScoringSetupError(
            f"scoring.prefix_load_factor must be >= 1, got {scoring.prefix_load_factor}"
        )
    if not scoring.prefix_min_capacity >= 0:
        raise ScoringSetupError(
            f"scoring.prefix_min_capacity must be >= 0, got {scoring.prefix_min_capacity}"
        )
    if not scoring.max_candidates >= 0:
        raise ScoringSetupError(
            f"scoring.max_candidates must be >= 0 (0: no cap), got {scoring.max_candidates}"
        )
    weighted: list[WeightedScorer] = []
    for name in sorted(registered):
        scorer = registered[name]
        weight = scoring.weights.get(name, scorer.default_weight)
        if not (weight >= 0.0 and math.isfinite(weight)):
            source = f"scoring.weights.{name}" if name in scoring.weights else f"{name} default"
            raise ScoringSetupError(f"{source}: weight must be a finite number >= 0, got {weight}")
        if weight == 0.0:
            continue
        if isinstance(scorer, ConfigurableScorer):
            scorer = scorer.configured(scoring)
        weighted.append(WeightedScorer(name, scorer, float(weight)))
    if not weighted:
        raise ScoringSetupError(
            f"every scorer has weight 0 (registered: {known}); give at least one a weight > 0"
        )
    return tuple(weighted)


class ScoringEngine:
    """Ranks the targets of one model for one request.

    Build it standalone (as the simulator does) from a store, a tracker and scorers::

        store, inflight = StateStore(), InflightTracker()
        engine = ScoringEngine(store, inflight, resolve_scorers(
            {s.name: s for s in builtin_scorers()}, ScoringConfig()))
        ranking = engine.rank(RequestFeatures(model="m"), now=time.time())

    `rtt_estimate` (e.g. the gossip mesh's Vivaldi estimate) fills `TargetView.rtt_s` for each
    candidate's node, asked once per node per ranking; without it every `rtt_s` is None.
    """

    def __init__(
        self,
        store: StateStore,
        inflight: InflightTracker,
        scorers: Sequence[WeightedScorer],
        *,
        stale_after_s: float = 5.0,
        rtt_estimate: RttEstimate | None = None,
        max_candidates: int = 0,
        sample_seed: int = 0,
    ) -> None:
        """`max_candidates` > 0 bounds how many targets one decision scores when a model has
        more (infermesh.core.scoring.sampling); 0 scores every candidate."""
        if not scorers:
            raise ScoringSetupError("the scoring engine needs at least one scorer")
        self.store = store
        self.inflight = inflight
        self.scorers = tuple(scorers)
        self.stale_after_s = stale_after_s
        self.rtt_estimate = rtt_estimate
        self._total_weight = sum(ws.weight for ws in self.scorers)
        self.scorer_failures: dict[str, int] = {}
        self.rtt_estimate_failures = 0
        # id(candidate tuple) -> (that tuple, its target ids); the tuple is kept so that the
        # id cannot be reused by another tuple while the entry lives.
        self._ids_cache: dict[
            int, tuple[tuple[ModelState, ...] | tuple[TargetKey, ...], tuple[str, ...]]
        ] = {}
        self.policy = _EMPTY_POLICY
        # id(scoring policy) -> (it, the scorers it weights, their total weight); cleared by
        # set_policy, whose PolicySet keeps every cached policy alive meanwhile.
        self._weights_cache: dict[int, tuple[ScoringPolicy, tuple[WeightedScorer, ...], float]] = {}
        self._policy_filters = False
        scorer_objects = [ws.scorer for ws in self.scorers]
        self.sampler = CandidateSampler(max_candidates, seed=sample_seed, scorers=scorer_objects)
        # Scorers told where each ranked request goes (its first target), e.g. prefix affinity.
        self._learners = tuple(s for s in scorer_objects if isinstance(s, LearningScorer))

    def set_policy(self, policy: PolicySet) -> None:
        """Use `policy` from the next ranking on (drains, pins, scoring weights and filters).

        Policy values were validated when their command was applied; here a scoring weight that
        names a scorer this engine does not run (unknown, or disabled with weight 0 in
        `[scoring]`) is ignored, and a policy that would leave every scorer at weight 0 falls back
        to the configured weights.
        """
        self.policy = policy
        self._weights_cache.clear()
        self._policy_filters = bool(
            policy.drains
            or policy.pins
            or any(
                sp.max_waiting is not None or sp.max_kv_cache_usage is not None
                for sp in policy.scoring.values()
            )
        )

    def _request_policy(self, request: RequestFeatures) -> _RequestPolicy:
        policy = self.policy
        pin = policy.pins.get(request.model)
        scoring = policy.scoring_for(request.model, request.slo_class) if policy.scoring else None
        return _RequestPolicy(policy.drains, pin.nodes if pin is not None else None, scoring)

    def _weighted(self, scoring: ScoringPolicy | None) -> tuple[tuple[WeightedScorer, ...], float]:
        """The scorers and their total weight under `scoring`'s weights (configured if None)."""
        if scoring is None or not scoring.weights:
            return self.scorers, self._total_weight
        cached = self._weights_cache.get(id(scoring))
        if cached is not None and cached[0] is scoring:
            return cached[1], cached[2]
        weights = scoring.weights
        scorers = tuple(
            attrs.evolve(ws, weight=float(weights[ws.name])) if ws.name in weights else ws
            for ws in self.scorers
        )
        scorers = tuple(ws for ws in scorers if ws.weight > 0)
        total = sum(ws.weight for ws in scorers)
        if not scorers or not total > 0:
            scorers, total = self.scorers, self._total_weight
        self._weights_cache[id(scoring)] = (scoring, scorers, total)
        return scorers, total

    @classmethod
    def from_config(
        cls,
        store: StateStore,
        inflight: InflightTracker,
        registered: Mapping[str, Scorer],
        scoring: ScoringConfig,
        *,
        rtt_estimate: RttEstimate | None = None,
    ) -> ScoringEngine:
        return cls(
            store,
            inflight,
            resolve_scorers(registered, scoring),
            stale_after_s=scoring.stale_after_s,
            rtt_estimate=rtt_estimate,
            max_candidates=scoring.max_candidates,
        )

    # ------------------------------------------------------------------ filters

    def exclusion(
        self, state: ModelState, request: RequestFeatures, now: float
    ) -> Exclusion | None:
        """Why `state` cannot serve `request` now, or None when it can."""
        return self._exclusion(state, request, now, self._request_policy(request))

    def _exclusion(
        self, state: ModelState, request: RequestFeatures, now: float, policy: _RequestPolicy
    ) -> Exclusion | None:
        policy_exclusion = self._policy_exclusion(state, policy)
        if policy_exclusion is not None:
            return policy_exclusion
        if not state.loaded:
            return Exclusion(state.key.target_id, "model not loaded")
        if state.warming:
            return Exclusion(state.key.target_id, "warming up", transient=True)
        if not state.healthy:
            why = state.health_reason or "reported unhealthy by its runtime"
            return Exclusion(state.key.target_id, f"unhealthy: {why}")
        age_s = now - state.last_updated
        if age_s > self.stale_after_s:
            why = f"telemetry {age_s:.1f}s old (stale after {self.stale_after_s:g}s)"
            return Exclusion(state.key.target_id, why, transient=True)
        for name, wanted in request.filters:
            actual = getattr(state.key, name) if name in _KEY_FILTERS else state.labels.get(name)
            if actual != wanted:
                why = f"label {name}={actual or ''} does not match filter {name}={wanted}"
                return Exclusion(state.key.target_id, why)
        if state.labels.gpu_uuid:
            # Only a target mapped to its GPUs: without the mapping, one faulty GPU of the
            # node would take every replica of the node out.
            gpu_fault = gpu_exclusion_reason(self.store.gpus_for(state))
            if gpu_fault is not None:
                return Exclusion(state.key.target_id, gpu_fault)
        return None

    @staticmethod
    def _policy_exclusion(state: ModelState, policy: _RequestPolicy) -> Exclusion | None:
        """Why the operator policy keeps `state` from new requests, or None."""
        node = state.key.node
        target_id = state.key.target_id
        drain = policy.drains.get(node)
        if drain is not None:
            why = f"node {node} is drained" + (f": {drain.reason}" if drain.reason else "")
            return Exclusion(target_id, why)
        if policy.pinned is not None and node not in policy.pinned:
            why = f"model {state.key.model} is pinned to nodes {', '.join(policy.pinned)}"
            return Exclusion(target_id, why)
        scoring = policy.scoring
        if scoring is not None:
            if scoring.max_waiting is not None and state.waiting > scoring.max_waiting:
                why = f"waiting {state.waiting:g} > policy max_waiting {scoring.max_waiting}"
                return Exclusion(target_id, why, transient=True)
            limit = scoring.max_kv_cache_usage
            if limit is not None and state.kv_cache_usage > limit:
                used = f"{state.kv_cache_usage:.0%}"
                why = f"KV cache {used} used > policy max_kv_cache_usage {limit:g}"
                return Exclusion(target_id, why, transient=True)
        return None

    def view(self, state: ModelState, now: float, target_id: str | None = None) -> TargetView:
        """The scorers' view of `state` at `now`, with in-flight and outcome feedback."""
        if target_id is None:
            target_id = state.key.target_id
        inflight = self.inflight
        stats = inflight.stats(target_id)
        seen_at = state.last_updated
        return TargetView(
            state=state,
            in_flight=inflight.in_flight(target_id, seen_at),
            finished_unseen=inflight.finished_unseen(target_id, seen_at),
            open_before_scrape=inflight.open_before(target_id, seen_at, self.stale_after_s),
            gpus=self.store.gpus_for(state),
            ttft_ewma_s=stats.ttft_ewma_s if stats else None,
            error_rate=stats.error_rate if stats else 0.0,
            now=now,
            rtt_s=self._rtt_s(state.key.node),
        )

    def _rtt_s(self, node: str) -> float | None:
        """The estimated RTT to `node`; a failing or nonsensical estimate counts as unknown."""
        estimate = self.rtt_estimate
        if estimate is None:
            return None
        try:
            rtt_s = estimate(node)
        except Exception:
            # Like a broken scorer, a broken estimate must not take the hot path down.
            self.rtt_estimate_failures += 1
            return None
        return finite_or_none(rtt_s)

    # ------------------------------------------------------------------ ranking

    def rank(self, request: RequestFeatures, now: float, max_targets: int = 0) -> Ranking:
        """Filter, score and order the candidates for `request`; best first.

        Ties are broken by target id, so the same inputs always give the same order. A model
        with more than `max_candidates` targets has only a bounded set of them scored
        (infermesh.core.scoring.sampling); the filters apply to each scored one.
        """
        self.inflight.expire(now)
        store = self.store
        rows = store.candidate_rows(request.model)
        if not rows:
            known = store.model_known(request.model)
            return Ranking((), known, 0, (), RETRY_UNAVAILABLE_S if known else 0.0)
        sampler = self.sampler
        if sampler.applies(len(rows)):
            keys = store.candidate_keys(request.model)
            target_ids = self._target_ids(keys)
            order = sampler.order(request.model, keys, rows, target_ids, request, now)
            ranking = self._rank(request, now, max_targets, rows, order, sampler.max_candidates)
            if ranking.targets:
                return self._learned(request, ranking, now)
            # Nothing usable among the sampled: look at every candidate before giving up.
        ranking = self._rank(request, now, max_targets, rows, range(len(rows)), 0)
        return self._learned(request, ranking, now)

    def _learned(self, request: RequestFeatures, ranking: Ranking, now: float) -> Ranking:
        """Tell the learning scorers where the request goes (the first target), then return
        the ranking."""
        if ranking.targets:
            target_id = ranking.targets[0].target_id
            for learner in self._learners:
                learner.learn(request, target_id, now)
        return ranking

    def _rank(
        self,
        request: RequestFeatures,
        now: float,
        max_targets: int,
        rows: Sequence[CandidateRow],
        indices: Iterable[int],
        limit: int,
    ) -> Ranking:
        """Rank the candidates at `indices` of the model's `rows`; with `limit` > 0, stop after
        that many usable ones."""
        policy = self._request_policy(request)
        targets, excluded_list = self._views(request, now, rows, indices, limit, policy)
        ids = targets.ids
        excluded_ = tuple(excluded_list)
        if not targets:
            transient = any(e.transient for e in excluded_)
            retry_after_s = RETRY_TRANSIENT_S if transient else RETRY_UNAVAILABLE_S
            return Ranking((), True, len(rows), excluded_, retry_after_s)
        scorers, total_weight = self._weighted(policy.scoring)
        columns = [self._run_scorer(ws, request, targets) for ws in scorers]
        count = len(targets)
        if count == 1:
            results = tuple(column.result(0) for column in columns)
            total = sum(ws.weight * r.score for ws, r in zip(scorers, results, strict=True))
            score = min(1.0, total / total_weight)
            only = RankedTarget(ids[0], targets[0], score, results, scorers)
            return Ranking((only,), True, len(rows), excluded_, 0.0)
        # totals[i] = sum of weight * score over the scorers, added in scorer order; C-speed
        # maps (each column's length was checked by `_run_scorer`).
        totals = [0.0] * count
        for ws, column in zip(scorers, columns, strict=True):
            totals = list(map(add, totals, map(mul, repeat(ws.weight), column.scores)))
        # Best total first, ties by target id: the same inputs always give the same order.
        order = _best_first(totals, ids, max_targets)
        ranked = tuple(
            RankedTarget(
                ids[i],
                targets[i],
                min(1.0, totals[i] / total_weight),
                tuple([column.result(i) for column in columns]),
                scorers,
            )
            for i in order
        )
        return Ranking(ranked, True, len(rows), excluded_, 0.0)

    def _views(
        self,
        request: RequestFeatures,
        now: float,
        rows: Sequence[CandidateRow],
        indices: Iterable[int],
        limit: int,
        policy: _RequestPolicy,
    ) -> tuple[ViewTable, list[Exclusion]]:
        """The usable candidates at `indices` (at most `limit` when > 0), as the table the
        scorers read (views built only when read), and the exclusions met on the way."""
        kept: list[CandidateRow] = []  # the scored rows
        excluded: list[Exclusion] = []
        # Without request filters or policy filters, a plain row (`CandidateRow.plain`) only
        # needs its staleness checked; `_exclusion` gives the verdict (and reason) otherwise.
        check_filters = bool(request.filters) or self._policy_filters
        stale_after_s = self.stale_after_s
        for i in indices:
            row = rows[i]
            # `row.plain`, `row.last_updated`, by position (cheaper than by name).
            fresh = now - row[LAST_UPDATED_AT] <= stale_after_s
            if check_filters or not row[PLAIN_AT] or not fresh:
                exclusion = self._exclusion(row.state, request, now, policy)
                if exclusion is not None:
                    excluded.append(exclusion)
                    continue
            kept.append(row)
            if len(kept) == limit:
                break
        # What the views need beyond the rows, a column at a time.
        ids: list[str] = list(map(_TARGET_ID, kept))
        tracked = self.inflight.view_inputs_many(ids, list(map(_LAST_UPDATED, kept)), stale_after_s)
        store = self.store
        gpus_by_node = store.gpus_by_node
        gpus: list[tuple[GpuState, ...]]
        if not gpus_by_node:
            gpus = [()] * len(kept)  # no GPU telemetry at all
        else:
            gpus_for = store.gpus_for
            gpus = [
                # StateStore.gpus_for, inlined for a target without a gpu_uuid label.
                gpus_by_node.get(row.node, ()) if row.plain else gpus_for(row.state)
                for row in kept
            ]
        rtts: list[float | None]
        if self.rtt_estimate is None:
            rtts = [None] * len(kept)
        else:
            # One estimate per node per ranking: replicas of a model often share a node.
            rtt_by_node: dict[str, float | None] = {}
            rtts = []
            for row in kept:
                node = row.node
                if node not in rtt_by_node:
                    rtt_by_node[node] = self._rtt_s(node)
                rtts.append(rtt_by_node[node])
        return ViewTable.of_rows(now, kept, ids, tracked, gpus, rtts), excluded

    def _target_ids(
        self, candidates: tuple[ModelState, ...] | tuple[TargetKey, ...]
    ) -> tuple[str, ...]:
        """The target ids of a candidate tuple (states or keys), kept while the store hands out
        the same tuple (it builds a new one whenever a target of the model changes; a new keys
        tuple only when membership changes)."""
        cached = self._ids_cache.get(id(candidates))
        if cached is not None and cached[0] is candidates:
            return cached[1]
        ids = tuple(
            c.target_id if isinstance(c, TargetKey) else c.key.target_id for c in candidates
        )
        if len(self._ids_cache) >= _IDS_CACHE_SIZE:
            self._ids_cache.clear()
        self._ids_cache[id(candidates)] = (candidates, ids)
        return ids

    def _run_scorer(
        self, ws: WeightedScorer, request: RequestFeatures, views: Sequence[TargetView]
    ) -> ScoreColumn:
        # A broken third-party scorer must not take the hot path down: it counts as neutral.
        scorer = ws.scorer
        try:
            score_column = column_of(scorer)
            if score_column is None:
                results = scorer.score(request, views)
                if len(results) != len(views):
                    raise ValueError(f"returned {len(results)} results for {len(views)} targets")
                return results_column(results)
            column = score_column(request, views)
            scores = column.scores
            if len(scores) != len(views):
                raise ValueError(f"returned {len(scores)} scores for {len(views)} targets")
            # C-speed range check; NaN fails `sum(...) >= 0` (min and max may skip it).
            if not (min(scores) >= 0.0 and max(scores) <= 1.0 and sum(scores) >= 0.0):
                bad = next(s for s in scores if not 0.0 <= s <= 1.0)
                raise ValueError(f"score {bad} outside [0, 1]")
            return column
        except Exception as exc:
            self.scorer_failures[ws.name] = self.scorer_failures.get(ws.name, 0) + 1
            failed = ScoreResult(0.5, f"scorer failed ({type(exc).__name__}: {exc}): neutral")
            return ScoreColumn([0.5] * len(views), lambda _: failed)

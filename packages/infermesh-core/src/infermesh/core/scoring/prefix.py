"""Prefix affinity: sends requests whose prompts start alike to the replicas that served such
prompts recently, while those replicas have room.

A request carries keys of its prompt's leading tokens at increasing depths (`PREFIX_DEPTHS`:
64, 128, ... tokens, `RequestFeatures.prefix_keys`). The engine tells the `PrefixIndex` where
each ranked request went (`PrefixAffinityScorer.learn`); the scorer then finds, for each
candidate, the deepest of the request's keys that was recently sent there (the longest match,
like llm-d's prefix scorer over block hashes) and scores the fraction of the prompt that match
covers. A prompt none of whose keys was seen recently scores a neutral 0.5 everywhere, so a
never-seen prompt goes where the other scorers (queue, KV) send it: to an idle replica, not to
a hashed one.

The candidate sampler (infermesh.core.scoring.sampling) reads the same index, so at fleet scale
the replicas the scorer would favour are always among the scored ones.

The rendezvous (highest-random-weight) hash is here too: the simulator's routing cells use it.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from statistics import median
from typing import Protocol, runtime_checkable

import attrs

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import ScoreResult, TargetView
from infermesh.core.model import GpuState, RequestFeatures
from infermesh.core.scoring.gpu_speed import (
    GpuSpeed,
    decode_figure,
    fill_rates,
    prefill_figure,
    replica_speed,
)
from infermesh.core.scoring.views import ViewTable, table_of

__all__ = [
    "PREFIX_DEPTHS",
    "LearningScorer",
    "PrefixAffinityScorer",
    "PrefixIndex",
    "hrw_weight",
    "request_prefix_keys",
    "target_hash",
]

_MASK64 = (1 << 64) - 1

PREFIX_DEPTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
"""Depths, in tokens, of a prompt's prefix keys (all multiples of vLLM's 16-token KV block).

`prefix_keys[i]` hashes the prompt's first `PREFIX_DEPTHS[i]` tokens (the first key hashes the
whole prompt when it is shorter than 64 tokens); text is hashed at 4 characters per token."""

RECENT_S = 300.0
"""How long the index remembers that a prefix was sent to a replica (its prefix cache is likely
to still hold it)."""
MAX_KEYS = 65536
"""Prefix keys the index remembers (least recently used dropped first)."""
HOMES_PER_KEY = 8
"""Replicas remembered per key (the least recently used dropped first)."""


def request_prefix_keys(request: RequestFeatures) -> tuple[int, ...]:
    """The request's prefix keys, shallowest first: `prefix_keys`, or `(prefix_key,)` from a
    router that sends only the one key; empty without any."""
    if request.prefix_keys:
        return request.prefix_keys
    return (request.prefix_key,) if request.prefix_key else ()


class PrefixIndex:
    """Where prompts with each prefix key were sent recently: key -> {target id: when}.

    Bounded: at most `max_keys` keys (least recently used dropped first) and `homes_per_key`
    targets per key; an entry older than `recent_s` (injected clock) no longer counts.
    Sans-I/O: every call takes the time.
    """

    def __init__(
        self,
        *,
        max_keys: int = MAX_KEYS,
        homes_per_key: int = HOMES_PER_KEY,
        recent_s: float = RECENT_S,
    ) -> None:
        if max_keys < 1 or homes_per_key < 1:
            raise ValueError(
                f"PrefixIndex needs max_keys >= 1 and homes_per_key >= 1, "
                f"got {max_keys} and {homes_per_key}"
            )
        if not (recent_s > 0 and math.isfinite(recent_s)):
            raise ValueError(f"PrefixIndex recent_s must be a finite number > 0, got {recent_s}")
        self.max_keys = max_keys
        self.homes_per_key = homes_per_key
        self.recent_s = recent_s
        # key -> {target id: last sent}, both in least-recently-used-first order
        self._homes: OrderedDict[int, dict[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._homes)

    def record(self, keys: Sequence[int], target_id: str, now: float) -> None:
        """A request with these prefix keys was sent to `target_id` at `now`."""
        entries = self._homes
        for key in keys:
            homes = entries.get(key)
            if homes is None:
                entries[key] = {target_id: now}
                if len(entries) > self.max_keys:
                    entries.popitem(last=False)
                continue
            entries.move_to_end(key)
            homes.pop(target_id, None)
            homes[target_id] = now
            if len(homes) > self.homes_per_key:
                del homes[next(iter(homes))]

    def matches(self, keys: Sequence[int], now: float) -> Iterator[tuple[int, list[str]]]:
        """(depth level, targets it was sent to recently) for each of `keys` (level i is
        `keys[i]`) that has any, deepest first; the most recently used target first."""
        entries = self._homes
        horizon = now - self.recent_s
        for level in range(len(keys) - 1, -1, -1):
            homes = entries.get(keys[level])
            if not homes:
                continue
            recent = [tid for tid, at in homes.items() if at >= horizon]
            if recent:
                recent.reverse()
                yield level, recent


@runtime_checkable
class LearningScorer(Protocol):
    """A scorer that learns where the engine sent each ranked request (its first target)."""

    def learn(self, request: RequestFeatures, target_id: str, now: float) -> None: ...


@lru_cache(maxsize=65536)
def target_hash(target_id: str) -> int:
    """A target id's stable 64-bit hash (its rendezvous position)."""
    return int.from_bytes(hashlib.blake2b(target_id.encode(), digest_size=8).digest(), "big")


def hrw_weight(prefix_key: int, target_id: str) -> int:
    """Rendezvous (highest-random-weight) weight of a target for a prefix key.

    Stable across processes and machines (no per-process hash seed), so every process that sees
    the same candidates orders them the same way for a prefix.
    """
    x = (prefix_key ^ target_hash(target_id)) & _MASK64
    # splitmix64 finaliser: mixes every input bit into every output bit.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@attrs.frozen
class PrefixAffinityScorer:
    """Keeps requests whose prompts start alike on the replicas that hold that prefix, until
    those replicas are loaded.

    For each candidate, the deepest of the request's prefix keys (`PREFIX_DEPTHS`) that the
    engine sent to it within `RECENT_S` (`PrefixIndex`) is its match; score = matched depth /
    the deepest match among the candidates, so the replica holding most of the prompt scores 1,
    one holding only a shared system prompt less, the others 0. A replica whose load
    (`TargetView.load`: running + waiting + unseen, corrected for what the routers did since
    the scrape) is at or above the capacity scores 0: the prefix spills to wherever the other
    scorers send it, and that replica becomes one more home of the prefix. A prompt none of
    whose keys was sent anywhere recently scores a neutral 0.5 on every target with room (less
    on slow ones when it is long: `_cold_scores`) and 0 on a loaded one, so it is placed by the
    other scorers, never by a hash, and still kept off a replica at capacity. When every
    replica that got the prefix is at capacity, the prompt is a cold prefill wherever it goes:
    the other replicas then score as for a never-seen prompt (neutral, less on slow ones when
    the prompt is long), not 0.

    The capacity is max(ceil(load_factor * (total load + 1) / candidates), min_capacity): the
    bounded-load rule, but never below `min_capacity`, so a replica that batches many sequences
    keeps its prefix (and its prefix cache) while the others are idle. A replica slower than the
    candidates' median measured decode rate (infermesh.core.scoring.capacity) gets that capacity
    scaled by its relative speed (at least 1).

    A replica that has measured no decode rate yet (it has served nothing) is taken at the
    speed its GPU model implies (infermesh.core.scoring.gpu_speed: the measured rate of its
    model's other replicas, else the datasheet ratio to the measured ones, else the datasheet
    alone): prefill TFLOPS for a cold prefill, memory bandwidth for the capacity. Its reason says
    "prior from GPU model ...". Measured rates always win.

    The index is this scorer's own memory: `configured` (called once per engine) gives the
    configured scorer a fresh one, and the engine feeds it through `learn`.
    """

    load_factor: float = 1.25
    min_capacity: int = 4
    name: str = "prefix"
    default_weight: float = 3.0
    index: PrefixIndex = attrs.field(factory=PrefixIndex, eq=False, repr=False)

    def configured(self, scoring: ScoringConfig) -> PrefixAffinityScorer:
        return attrs.evolve(
            self,
            load_factor=scoring.prefix_load_factor,
            min_capacity=scoring.prefix_min_capacity,
            index=PrefixIndex(),
        )

    def learn(self, request: RequestFeatures, target_id: str, now: float) -> None:
        """Remember that `request` was sent to `target_id` at `now`."""
        keys = request_prefix_keys(request)
        if keys:
            self.index.record(keys, target_id, now)

    def score(self, request: RequestFeatures, targets: Sequence[TargetView]) -> list[ScoreResult]:
        count = len(targets)
        keys = request_prefix_keys(request)
        if not keys or count == 0:
            return [_NO_KEY] * count
        # The scored targets as columns (engine's table: no view built for them).
        table = table_of(targets)
        level_of: dict[str, int] = {}
        top = -1
        for level, homes in self.index.matches(keys, table.now):
            if top < 0:
                top = level
            for tid in homes:
                level_of.setdefault(tid, level)
        loads = table.loads
        bounded = math.ceil(self.load_factor * (sum(loads) + 1) / count)
        capacity = max(bounded, self.min_capacity)
        # Each target's decode rate, looked up once per decision for every use below.
        speeds = _Speeds.of_table(table)
        caps = _speed_capacities(speeds, capacity)
        if top < 0:
            cold = _cold_scores(request.prompt_tokens, speeds)
            for i, load in enumerate(loads):
                cap = capacity if caps is None else caps[i][0]
                if load >= cap:
                    cold[i] = ScoreResult.deferred(0.0, _loaded_reason, load, cap, bounded)
            return cold
        top_depth = _depth(top)
        deferred = ScoreResult.deferred
        results: list[ScoreResult] = []
        not_here = ScoreResult.deferred(0.0, _elsewhere_reason, keys[top], top_depth)
        elsewhere: list[int] = []
        room = False
        for i, target_id in enumerate(table.ids):
            matched = level_of.get(target_id)
            if matched is None:
                results.append(not_here)
                elsewhere.append(i)
                continue
            cap, speed = (capacity, 1.0) if caps is None else caps[i]
            depth = _depth(matched)
            fits = loads[i] < cap
            room = room or fits
            results.append(
                deferred(
                    depth / top_depth if fits else 0.0,
                    _home_reason,
                    keys[matched],
                    depth,
                    top_depth,
                    loads[i],
                    cap,
                    bounded,
                    speed,
                )
            )
        if not room and elsewhere:
            # Every home is loaded. A spill pays a cold prefill of the whole prompt, the home
            # its queue. Spill only to a replica about as fast as the fastest home (measured,
            # else its GPU model's speed: `_Speeds.filled`): it scores as for a never-seen
            # prompt; slower ones keep 0, as when a home has room, and the queue and KV scorers
            # place the request among the homes. (A spill to any replica, slower ones
            # included, halved the simulated 512-replica p95 but sent live requests into slow
            # cold prefills: docs/results.md. Without the GPU-model estimate, an idle fleet's
            # unmeasured H100s could not take a spill and an A10 near the router did.)
            elsewhere_set = set(elsewhere)
            rates = speeds.filled(decode_figure)
            best_home = max(
                (r for i, r in enumerate(rates) if i not in elsewhere_set and r is not None),
                default=0.0,
            )
            cold = _cold_scores(request.prompt_tokens, speeds.subset(elsewhere))
            for i, result in zip(elsewhere, cold, strict=True):
                cap = capacity if caps is None else caps[i][0]
                if loads[i] >= cap:
                    result = ScoreResult.deferred(0.0, _loaded_reason, loads[i], cap, bounded)
                elif best_home > 0.0:
                    rate = rates[i]
                    if rate is None or rate < SPILL_SPEED_RATIO * best_home:
                        continue
                if result is _NOT_SEEN:
                    result = _HOMES_LOADED
                results[i] = result
        return results


_NO_KEY = ScoreResult(0.5, "no prefix key: neutral")
_NOT_SEEN = ScoreResult(0.5, "prefix not sent anywhere recently: neutral")
_HOMES_LOADED = ScoreResult(0.5, "every replica that got this prefix recently is loaded: neutral")

SPILL_SPEED_RATIO = 0.9
"""When every home of a prefix is loaded, a replica elsewhere is scored as for a cold prompt
only if its decode rate (measured, else its GPU model's) is at least this fraction of the
fastest home's."""

COLD_PROMPT_TOKENS = 2048
"""A prompt no replica holds costs a full prefill wherever it goes: a replica at `rel` of the
fastest candidate's measured speed scores 0.5 * rel ** (prompt tokens / this), so at this many
tokens one at a third of the speed scores a third of neutral, at twice as many a ninth (the
prefill's extra seconds grow with the prompt), and a short prompt loses little anywhere."""


class _Speeds:
    """The candidates' decode rates as measured, and (computed only when some are missing)
    each one's GPU-model prior (`replica_speed`)."""

    __slots__ = ("_filled", "_priors", "gpus", "measured")

    def __init__(
        self,
        gpus: Sequence[tuple[GpuState, ...]],
        measured: list[float | None],
        priors: list[GpuSpeed | None] | None = None,
    ) -> None:
        self.gpus = gpus
        self.measured = measured
        self._priors = priors
        self._filled: dict[Callable[[GpuSpeed], float], list[float | None]] = {}

    @classmethod
    def of_table(cls, table: ViewTable) -> _Speeds:
        """The measured rates of `table`'s targets (the store computed each state's once)."""
        measured = [None if f.speed is None else f.speed.tokens_per_s for f in table.features]
        return cls(table.gpus, measured)

    def __len__(self) -> int:
        return len(self.measured)

    @property
    def complete(self) -> bool:
        """Every candidate measures its rate."""
        return None not in self.measured

    def priors(self) -> list[GpuSpeed | None]:
        if self._priors is None:
            self._priors = [replica_speed(gpus) for gpus in self.gpus]
        return self._priors

    def filled(self, figure: Callable[[GpuSpeed], float]) -> list[float | None]:
        """Measured rates, the missing ones estimated from the GPU model (`fill_rates`)."""
        if self.complete:
            return self.measured
        filled = self._filled.get(figure)
        if filled is None:
            filled = self._filled[figure] = fill_rates(self.measured, self.priors(), figure)
        return filled

    def subset(self, indices: Sequence[int]) -> _Speeds:
        priors = self._priors
        return _Speeds(
            [self.gpus[i] for i in indices],
            [self.measured[i] for i in indices],
            None if priors is None else [priors[i] for i in indices],
        )


def _cold_scores(prompt_tokens: int, speeds: _Speeds) -> list[ScoreResult]:
    """A prompt no candidate holds: neutral, less on replicas slower than the fastest one, by
    the prompt's length (a long cold prefill belongs on a fast GPU). A replica not measured yet
    counts at its GPU model's prefill speed (`_Speeds.filled`), else at the median speed."""
    count = len(speeds)
    weight = prompt_tokens / COLD_PROMPT_TOKENS
    if weight <= 0.0:
        return [_NOT_SEEN] * count
    measured = speeds.measured
    rates = speeds.filled(prefill_figure)
    known = sorted(r for r in rates if r is not None)
    if not (known and known[-1] > 0):
        return [_NOT_SEEN] * count
    fastest = known[-1]
    # A replica of an unknown GPU that has not served anything yet is taken at the median
    # speed: no evidence that it is fast (a fresh fleet's slow GPUs would otherwise get the
    # long prompts).
    typical = min(1.0, median(known) / fastest)
    priors = None if speeds.complete else speeds.priors()
    results: list[ScoreResult] = []
    for i, rate in enumerate(rates):
        rel = typical if rate is None else min(1.0, rate / fastest)
        if rel >= 1.0:
            results.append(_NOT_SEEN)
            continue
        score = 0.5 * rel**weight
        if measured[i] is not None:
            results.append(ScoreResult.deferred(score, _cold_reason, rel, prompt_tokens))
        elif rate is not None and priors is not None and (prior := priors[i]) is not None:
            results.append(
                ScoreResult.deferred(score, _cold_prior_reason, rel, prompt_tokens, prior.model)
            )
        else:
            results.append(ScoreResult.deferred(score, _cold_unmeasured_reason, rel, prompt_tokens))
    return results


def _loaded_reason(load: float, capacity: int, bounded: int) -> str:
    return (
        f"prefix not sent anywhere recently, and loaded "
        f"(load {load:g} >= {_capacity_text(capacity, bounded, 1.0)})"
    )


def _cold_reason(rel: float, prompt_tokens: int) -> str:
    return (
        f"prefix not sent anywhere recently: a cold prefill of ~{prompt_tokens} tokens at "
        f"{rel:.2g}x the fastest candidate's measured speed"
    )


def _cold_prior_reason(rel: float, prompt_tokens: int, model: str) -> str:
    return (
        f"prefix not sent anywhere recently: a cold prefill of ~{prompt_tokens} tokens at "
        f"{rel:.2g}x the fastest candidate's speed (not measured yet: prior from GPU model "
        f"{model})"
    )


def _cold_unmeasured_reason(rel: float, prompt_tokens: int) -> str:
    return (
        f"prefix not sent anywhere recently: a cold prefill of ~{prompt_tokens} tokens on a "
        f"replica not measured yet, taken at the candidates' median speed ({rel:.2g}x the "
        f"fastest)"
    )


def _depth(level: int) -> int:
    """Tokens covered by the key at `level` (nominal: a short prompt's one key covers less)."""
    return PREFIX_DEPTHS[min(level, len(PREFIX_DEPTHS) - 1)]


def _speed_capacities(speeds: _Speeds, capacity: int) -> list[tuple[int, float]] | None:
    """Each target's prefix capacity and relative speed, or None when no target is slower than
    the median decode rate (then every target has `capacity`). A target not measured yet counts
    at its GPU model's decode speed (`_Speeds.filled`), else at the median."""
    rates = speeds.filled(decode_figure)
    known = sorted(r for r in rates if r is not None)
    if len(known) < 2:
        return None
    typical = median(known)
    if not (typical > 0 and known[0] < typical):
        return None
    caps: list[tuple[int, float]] = []
    full = (capacity, 1.0)  # an unmeasured target, or one at least as fast as the median
    for rate in rates:
        if rate is None:
            caps.append(full)
            continue
        rel = rate / typical
        # `min(1.0, rel)`: a NaN or a speed at or above the median counts as 1.
        caps.append((max(1, math.ceil(capacity * rel)), rel) if rel < 1.0 else full)
    return caps


def _capacity_text(capacity: int, bounded: int, speed: float) -> str:
    if speed < 1.0:
        return f"capacity {capacity} (scaled to its {speed:.2g}x median decode speed)"
    if capacity > bounded:
        return f"capacity {capacity} (minimum; bounded-load {bounded})"
    return f"capacity {capacity} (bounded-load)"


def _elsewhere_reason(key: int, top_depth: int) -> str:
    return f"prefix {key:016x} (~{top_depth} tokens) was sent to other replicas recently"


def _home_reason(
    key: int,
    depth: int,
    top_depth: int,
    load: float,
    capacity: int,
    bounded: int,
    speed: float,
) -> str:
    """Why a replica that recently got this prompt's prefix scored what it did."""
    capacity_text = _capacity_text(capacity, bounded, speed)
    match = f"prefix {key:016x}: first ~{depth} tokens sent here recently"
    if depth < top_depth:
        match += f" (another replica matches ~{top_depth})"
    if load >= capacity:
        return f"{match}, but loaded (load {load:g} >= {capacity_text})"
    return f"{match}, load {load:g} < {capacity_text}"

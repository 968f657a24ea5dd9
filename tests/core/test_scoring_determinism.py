"""Scoring decisions are reproducible to the bit: a fixed, seeded workload hashes to a recorded
digest.

Thousands of seeded decisions over fleets of 1 to 700 replicas, with candidate caps 0, 16 and
64, reservations, releases, outcomes and fresh telemetry between decisions, prefix-keyed
requests (so prefix homes form, fill up and spill), unmeasured and slow replicas, GPUs with
degradations and faults, request filters and an operator policy. The digest covers every
returned target id, total score and each scorer's score, weight and reason string, plus the
exclusions. A hot-path optimisation must leave it unchanged; a change meant to alter decisions
updates `DIGEST` (run this file as a script to print the new one) and says so in its commit.
"""

from __future__ import annotations

import hashlib
import random
import sys

from infermesh.core.config import ScoringConfig
from infermesh.core.model import (
    GpuKey,
    GpuStateDelta,
    Labels,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.policy import DrainNode, PolicyKind, PolicySet, ScoringPolicy, SetPolicy
from infermesh.core.scoring.engine import Ranking, ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

SEEDS = (1, 2, 3)
SIZES = (1, 3, 17, 65, 150, 700)
CAPS = (0, 16, 64)
DECISIONS = 45
"""Decisions per seed, fleet size and cap (fewer uncapped at 700: each scores every replica)."""
DIGEST = "2c8d1edc3ac9516dd772bfb3df2c4d5c664ff0554097c0465391488e12b734aa"


def _fleet(rng: random.Random, model: str, size: int, now: float) -> list[ModelStateDelta]:
    deltas = []
    for i in range(size):
        key = TargetKey(model=model, node=f"node-{i % max(1, size - 2):04d}", endpoint=f"e{i}")
        deltas.append(ModelStateDelta(key, 1, _telemetry(rng, i, now)))
    return deltas


def _telemetry(rng: random.Random, i: int, now: float) -> dict[str, object]:
    running = float(rng.randrange(0, 12))
    fields: dict[str, object] = {
        "labels": Labels(gpu_uuid=f"GPU-{i}" if i % 5 == 0 else "", zone="ab"[i % 2]),
        "running": running,
        "waiting": float(rng.randrange(0, 4)) if rng.random() < 0.5 else 0.0,
        "kv_cache_usage": rng.random(),
        "ttft_s": 0.05 + rng.random() * 0.3,
        "e2e_s": 1.0 + rng.random() * 4.0 if rng.random() < 0.8 else None,
        "last_updated": now - rng.random() * 0.5,
    }
    speed = rng.random()
    if speed < 0.5:
        fields["itl_s"] = 0.01 + rng.random() * 0.04
    elif speed < 0.8:
        fields["generation_tokens_per_s"] = running * (20.0 + rng.random() * 60.0)
    if rng.random() < 0.04:
        fields["healthy"] = False
    if rng.random() < 0.03:
        fields["warming"] = True
    if rng.random() < 0.03:
        fields["last_updated"] = now - 30.0  # stale
    return fields


def _gpu_delta(rng: random.Random, node: str, i: int, version: int, now: float) -> GpuStateDelta:
    changes: dict[str, object] = {
        "temperature_c": 60.0 + rng.random() * 40.0,
        "memory_total_bytes": 80 << 30,
        "memory_used_bytes": int((80 << 30) * rng.random()),
        "clock_event_reasons": frozenset({"sw_power_cap"} if rng.random() < 0.3 else ()),
        "xid_last": 79 if rng.random() < 0.05 else 0,
        "last_updated": now,
        # Known models give unmeasured replicas a GPU-model speed prior; the others do not.
        "name": ("NVIDIA H100 80GB HBM3", "NVIDIA A10", "NVIDIA A100-SXM4-80GB", "", "Mystery")[
            i % 5 if i % 10 else 4 - (i // 10) % 5
        ],
    }
    return GpuStateDelta(GpuKey(node, f"GPU-{i}"), version, changes)


def _request(rng: random.Random, model: str) -> RequestFeatures:
    group = rng.randrange(12)
    depth = rng.randrange(1, 5)
    keys = tuple(
        (group + 1) * 1000 + level + (rng.randrange(3) if level == 3 else 0)
        for level in range(depth)
    )
    kind = rng.random()
    return RequestFeatures(
        model=model,
        prompt_tokens=0 if kind < 0.1 else rng.randrange(10, 9000),
        max_output_tokens=rng.choice((0, 128, 512)),
        prefix_keys=keys if kind < 0.7 else (),
        prefix_key=group + 1 if 0.7 <= kind < 0.85 else 0,
        filters=(("zone", "a"),) if rng.random() < 0.05 else (),
    )


def _policy(model: str) -> PolicySet:
    policy = PolicySet().apply(DrainNode("node-0003", reason="maintenance"))
    weights = ScoringPolicy(model=model, weights={"prefix": 1.0, "queue": 3.0}, max_waiting=2)
    return policy.apply(SetPolicy(PolicyKind.SCORING, "heavy-queue", weights))


def _rtt(node: str) -> float | None:
    """A seeded stand-in for the gossip mesh's estimate: unknown for some nodes."""
    number = int(node.rsplit("-", 1)[1])
    return None if number % 4 == 3 else (number % 7) * 0.008


def _feed(digest: hashlib._Hash, ranking: Ranking) -> None:
    parts = [f"{ranking.model_known}|{ranking.candidates}|{ranking.retry_after_s!r}"]
    parts += [str(e) for e in ranking.excluded]
    for target in ranking.targets:
        parts.append(f"{target.target_id}|{target.score!r}")
        parts += [f"{r.scorer}|{r.score!r}|{r.weight!r}|{r.reason}" for r in target.reasons]
    digest.update("\n".join(parts).encode())
    digest.update(b"\x00")


def _run(digest: hashlib._Hash, seed: int, size: int, cap: int) -> int:
    rng = random.Random(seed * 1_000_003 + size * 101 + cap)
    now = 1000.0
    model = f"m{size}"
    store = StateStore()
    for delta in _fleet(rng, model, size, now):
        store.apply_model_delta(delta)
    gpu_versions = dict.fromkeys(range(0, size, 5), 1)
    for i in gpu_versions:
        store.apply_gpu_delta(_gpu_delta(rng, f"node-{i % max(1, size - 2):04d}", i, 1, now))
    inflight = InflightTracker(id_prefix="d")
    scoring = ScoringConfig(max_candidates=cap)
    registered = {s.name: s for s in builtin_scorers()}
    rtt = _rtt if seed == 2 else None
    engine = ScoringEngine(
        store,
        inflight,
        ScoringEngine.from_config(store, inflight, registered, scoring).scorers,
        stale_after_s=scoring.stale_after_s,
        rtt_estimate=rtt,
        max_candidates=cap,
        sample_seed=seed,
    )
    if seed == 3:
        engine.set_policy(_policy(model))
    versions = dict.fromkeys(range(size), 1)
    open_ids: list[str] = []
    decisions = DECISIONS // 4 if cap == 0 and size >= 700 else DECISIONS
    for _ in range(decisions):
        now += rng.random() * 0.2
        ranking = engine.rank(_request(rng, model), now, rng.choice((0, 1, 3)))
        _feed(digest, ranking)
        if ranking.targets and rng.random() < 0.8:
            for _ in range(rng.randrange(1, 4)):
                open_ids.append(inflight.reserve(ranking.targets[0].target_id, now).reservation_id)
        while open_ids and rng.random() < 0.5:
            reservation_id = open_ids.pop(rng.randrange(len(open_ids)))
            status = rng.choice((200, 200, 200, 500, 429, 0))
            inflight.release_outcome(reservation_id, now, status=status, latency_s=rng.random())
            reservation_target = ranking.targets[0].target_id if ranking.targets else ""
            if reservation_target:
                inflight.record_outcome(
                    reservation_target, ok=status == 200, status=status, ttft_s=rng.random()
                )
        for _ in range(rng.randrange(0, 1 + size // 10)):
            i = rng.randrange(size)
            versions[i] += 1
            key = TargetKey(model=model, node=f"node-{i % max(1, size - 2):04d}", endpoint=f"e{i}")
            fields = _telemetry(rng, i, now)
            store.apply_model_delta(ModelStateDelta(key, versions[i], fields))
        if gpu_versions and rng.random() < 0.2:
            i = rng.choice(sorted(gpu_versions))
            gpu_versions[i] += 1
            node = f"node-{i % max(1, size - 2):04d}"
            store.apply_gpu_delta(_gpu_delta(rng, node, i, gpu_versions[i], now))
    return decisions


def decisions_digest() -> tuple[str, int]:
    """The hex digest of the whole workload and how many decisions it made."""
    digest = hashlib.sha256()
    count = 0
    for seed in SEEDS:
        for size in SIZES:
            for cap in CAPS:
                count += _run(digest, seed, size, cap)
    return digest.hexdigest(), count


def test_seeded_decisions_hash_to_the_recorded_digest() -> None:
    digest, count = decisions_digest()
    assert count > 2000
    assert digest == DIGEST, (
        f"scoring decisions changed (digest {digest}); if that is intended, record it in DIGEST"
    )


if __name__ == "__main__":
    print(*decisions_digest())
    sys.exit(0)

"""Synthetic candidate replicas for the decision-cost benchmark: seeded, varied, all routable.

Each candidate is one target of the same model on its own node, with load, KV-cache use, prefix
hit rate and latencies drawn from `random.Random(seed)`, so the same seed gives the same fleet.
The same deltas feed the in-process store and the agent's State API.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from infermesh.core.model import Labels, ModelStateDelta, RequestFeatures, TargetKey

__all__ = ["candidate_deltas", "model_for", "requests", "telemetry_updates"]


def model_for(count: int) -> str:
    """The model a fleet of `count` candidates serves (one model per fleet size)."""
    return f"bench-model-{count}"


def candidate_deltas(count: int, now: float, seed: int = 0) -> list[ModelStateDelta]:
    """`count` first deltas (version 1), one per candidate replica, fresh at `now`."""
    rng = random.Random(seed)
    model = model_for(count)
    deltas = []
    for index in range(count):
        key = TargetKey(model=model, node=f"node-{index:05d}", endpoint=f"http://10.0.{index}:8000")
        running = float(rng.randrange(0, 64))
        deltas.append(
            ModelStateDelta(
                key=key,
                version=1,
                changes={
                    "labels": Labels(model=model, runtime="vllm", node=key.node),
                    "running": running,
                    "waiting": float(rng.randrange(0, 8)),
                    "kv_cache_usage": rng.random(),
                    "prefix_cache_hit_rate": rng.random(),
                    "ttft_s": 0.05 + rng.random() * 0.5,
                    "itl_s": 0.01 + rng.random() * 0.04,
                    "generation_tokens_per_s": running * 40.0,
                    "max_num_seqs": 256,
                    "last_updated": now,
                },
            )
        )
    return deltas


def telemetry_updates(
    deltas: Sequence[ModelStateDelta], seed: int = 0
) -> Iterator[ModelStateDelta]:
    """Endless fresh telemetry for the candidates of `deltas`, as a live fleet's scrapes land:
    each a seeded random candidate's next version with new running and waiting counts."""
    rng = random.Random(seed + 2)
    versions = [delta.version for delta in deltas]
    while True:
        index = rng.randrange(len(deltas))
        versions[index] += 1
        running = float(rng.randrange(0, 64))
        yield ModelStateDelta(
            key=deltas[index].key,
            version=versions[index],
            changes={
                "running": running,
                "waiting": float(rng.randrange(0, 8)),
                "generation_tokens_per_s": running * 40.0,
            },
        )


def requests(model: str, count: int, seed: int = 0) -> list[RequestFeatures]:
    """`count` chat requests with prompt sizes and prefix keys drawn from 16 prefix groups."""
    rng = random.Random(seed + 1)
    return [
        RequestFeatures(
            model=model,
            prompt_tokens=rng.randrange(200, 4000),
            max_output_tokens=256,
            prefix_key=rng.randrange(1, 17),
            stream=True,
        )
        for _ in range(count)
    ]

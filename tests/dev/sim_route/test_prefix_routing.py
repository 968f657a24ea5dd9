"""InferMesh's prefix routing in the simulator: unique prompts spread like least-request, the
turns of a conversation go back to the replica that holds its history. Small runs (seconds)."""

from __future__ import annotations

import random
from collections import Counter

from infermesh.dev.sim.route.infermesh_strategy import InferMeshStrategy, prefix_keys
from infermesh.dev.sim.route.strategy import SimRequest
from infermesh.dev.sim.route.world import FleetSpec, World
from infermesh.dev.sim.workloads import generate


def test_a_burst_of_unique_prompts_spreads_evenly_over_idle_replicas() -> None:
    # Never-seen prompts are neutral to prefix affinity: each goes to the least loaded replica
    # (the router's own in-flight count), not to where its hash would put it.
    requests = [
        SimRequest(
            request_id=f"u{i}", arrival_s=0.1 + i * 1e-4, prompt_tokens=200, output_tokens=64
        )
        for i in range(24)
    ]
    fleet = FleetSpec(replicas=8, profiles=("h100",))
    result = World(fleet, InferMeshStrategy(), seed=1).run(requests, 1.0)
    per_replica = Counter(record.replica_id for record in result.records)
    assert sorted(per_replica.values()) == [3] * 8


def test_the_turns_of_a_conversation_go_back_to_the_replica_of_its_earlier_turns() -> None:
    requests = list(generate("sessions", random.Random(4), 30.0, 4.0))
    fleet = FleetSpec(replicas=8, profiles=("h100",))
    result = World(fleet, InferMeshStrategy(), seed=4).run(requests, 30.0)
    last: dict[str, str | None] = {}
    follow_ups = same = 0
    for record in sorted(result.records, key=lambda r: r.request.arrival_s):
        session = record.request.session
        if session in last:
            follow_ups += 1
            same += record.replica_id == last[session]
        last[session] = record.replica_id
    assert follow_ups >= 40
    assert same >= 0.9 * follow_ups
    hit = result.prefix_hit_tokens / result.prefix_query_tokens
    assert hit > 0.5


def test_the_simulated_router_sends_the_routers_keys_at_every_depth() -> None:
    request = SimRequest(
        request_id="r",
        arrival_s=0.0,
        prompt_tokens=3000,
        output_tokens=8,
        prefix_group="g",
        prefix_tokens=2500,
    )
    keys = prefix_keys(request)
    assert len(keys) == 6  # 64 ... 2048 tokens
    shorter = SimRequest(
        request_id="s",
        arrival_s=0.0,
        prompt_tokens=2600,
        output_tokens=8,
        prefix_group="g",
        prefix_tokens=2500,
    )
    assert prefix_keys(shorter) == keys  # the same group prefix up to 2048 tokens

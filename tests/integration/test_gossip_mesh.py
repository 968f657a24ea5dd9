"""Five real agents on loopback form one gossip mesh: join through one seed, detect a SIGKILLed
member within the configured bound, let it rejoin, drop packets under a foreign key, and route
from node 1's router to a replica only node 3 has."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import aiohttp
import anyio
import openai
import pytest

from infermesh.agent.gossip.codec import Packet, encode_packet
from infermesh.agent.gossip.keyring import Keyring
from infermesh.agent.gossip.members import suspicion_min_timeout_s
from infermesh.agent.gossip.messages import Ping
from infermesh.core.config import load_config
from infermesh.dev.cluster import LocalCluster, cluster_specs
from infermesh.dev.harness import render_config
from infermesh.dev.loadgen import replica_tag_of

from .conftest import MODEL, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NODES = 5
ONLY_ON_N3 = "acme/only-on-n3"
# Short SWIM timings so failure detection takes seconds (advanced [gossip] overrides).
PROBE_INTERVAL_S = 0.3
GOSSIP_OPTIONS: tuple[tuple[str, float], ...] = (
    ("probe_interval_s", PROBE_INTERVAL_S),
    ("probe_timeout_s", 0.2),
    ("suspicion_mult", 3.0),
    ("gossip_interval_s", 0.1),
    ("push_pull_interval_s", 5.0),
)
SUSPICION_MAX_TIMEOUT_MULT = 6.0  # SwimConfig's default; the tests do not override it
LOADED_MACHINE_SLACK_S = 4.0  # dissemination and scheduling delays on a busy 2-core machine
ALL = {f"n{i}" for i in range(1, NODES + 1)}


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[LocalCluster]:
    """n1..n5, one emulated replica each; n3's serves a model no other node has; router on n1."""
    specs = cluster_specs(
        NODES,
        model=MODEL,
        models={3: ONLY_ON_N3},
        profile="instant",
        poll_interval_s=0.2,
        ready_timeout_s=90.0,
    )
    async with LocalCluster(specs, gossip_options=GOSSIP_OPTIONS) as running:
        yield running


async def states_seen(cluster: LocalCluster, node_id: str) -> dict[str, str]:
    try:
        return await cluster.members(node_id)
    except (aiohttp.ClientError, TimeoutError):
        return {}


async def dropped_unknown_key(cluster: LocalCluster, node_id: str) -> float:
    async with (
        aiohttp.ClientSession() as session,
        session.get(cluster.node(node_id).agent_metrics_url) as resp,
    ):
        page = await resp.text()
    sample = 'infermesh_gossip_packets_dropped_total{reason="unknown_key"} '
    for line in page.splitlines():
        if line.startswith(sample):
            return float(line.removeprefix(sample))
    raise AssertionError(f"{sample.strip()} is missing from {node_id}'s /metrics")


async def test_five_agents_join_through_one_seed_and_all_see_five_alive(
    cluster: LocalCluster,
) -> None:
    for node_id in sorted(ALL):

        async def sees_everyone_alive(node_id: str = node_id) -> bool:
            return await states_seen(cluster, node_id) == dict.fromkeys(ALL, "alive")

        await wait_for(sees_everyone_alive, f"{node_id} to see all {NODES} members alive")


async def test_packet_sealed_with_another_key_is_dropped_and_counted(
    cluster: LocalCluster,
) -> None:
    target = cluster.node("n2")
    before = await dropped_unknown_key(cluster, "n2")
    plaintext, _ = encode_packet(
        Packet(sender="intruder", sender_address="127.0.0.1:9", messages=(Ping(1, "n2"),))
    )
    sealed = Keyring([os.urandom(32)]).seal(plaintext)
    host, port = target.gossip_address.rsplit(":", 1)
    async with await anyio.create_udp_socket(local_host="127.0.0.1") as udp:
        await udp.sendto(sealed, host, int(port))

    async def counted() -> bool:
        return await dropped_unknown_key(cluster, "n2") >= before + 1

    await wait_for(counted, "n2 to count the packet under an unknown key", timeout_s=10)
    assert "intruder" not in await states_seen(cluster, "n2")


async def test_router_on_node_one_routes_to_the_replica_only_node_three_has(
    cluster: LocalCluster,
) -> None:
    router_url = cluster.node("n1").router_url

    async def model_listed() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{router_url}/v1/models") as resp,
        ):
            body = await resp.json(content_type=None)
        return ONLY_ON_N3 in [card.get("id") for card in body.get("data", [])]

    await wait_for(model_listed, f"n1's router to list {ONLY_ON_N3} (gossiped from n3)")
    async with openai.AsyncOpenAI(
        base_url=f"{router_url}/v1", api_key="unused", max_retries=0
    ) as client:
        reply = await client.chat.completions.create(
            model=ONLY_ON_N3,
            messages=[{"role": "user", "content": "which node answers?"}],
            max_tokens=4,
        )
    assert replica_tag_of(reply.id) == "n3-r0"
    assert reply.model == ONLY_ON_N3


async def test_killed_agent_is_declared_dead_by_every_other_within_the_bound_then_rejoins(
    cluster: LocalCluster,
) -> None:
    min_timeout_s = suspicion_min_timeout_s(3.0, NODES, PROBE_INTERVAL_S)
    # Worst case: probed last in this round and the next, then the full unconfirmed timeout.
    bound_s = (
        2 * (NODES - 1) * PROBE_INTERVAL_S
        + min_timeout_s * SUSPICION_MAX_TIMEOUT_MULT
        + LOADED_MACHINE_SLACK_S
    )
    for node_id in sorted(ALL):

        async def alive_everywhere(node_id: str = node_id) -> bool:
            return await states_seen(cluster, node_id) == dict.fromkeys(ALL, "alive")

        await wait_for(alive_everywhere, f"{node_id} to see all alive before the kill")
    victim = cluster.node("n5")
    killed_at = time.monotonic()
    await victim.kill_agent()
    others = sorted(ALL - {"n5"})
    detected_s: dict[str, float] = {}

    async def all_declare_it_dead() -> bool:
        for node_id in others:
            seen = await states_seen(cluster, node_id)
            if node_id not in detected_s and seen.get("n5") == "dead":
                detected_s[node_id] = time.monotonic() - killed_at
        return len(detected_s) == len(others)

    await wait_for(all_declare_it_dead, "every other agent to mark n5 dead", timeout_s=bound_s)
    assert max(detected_s.values()) <= bound_s, detected_s

    await victim.restart_agent()
    for node_id in sorted(ALL):

        async def rejoined(node_id: str = node_id) -> bool:
            return (await states_seen(cluster, node_id)).get("n5") == "alive"

        await wait_for(rejoined, f"{node_id} to see the restarted n5 alive again")
    assert await states_seen(cluster, "n5") == dict.fromkeys(ALL, "alive")


async def test_rendered_node_configs_are_valid_and_share_the_seed_and_key() -> None:
    cluster = LocalCluster(cluster_specs(3), gossip_options=GOSSIP_OPTIONS)
    try:
        seed = cluster.nodes[0].gossip_address
        for number, mesh in enumerate(cluster.nodes, start=1):
            text = render_config(
                mesh.spec,
                mesh.replicas,
                socket_path=mesh.socket_path,
                agent_metrics_port=mesh.agent_metrics_port,
                router_port=mesh.router_port,
                gossip_port=mesh.gossip_port,
            )
            mesh.config_path.write_text(text)
            config = load_config(mesh.config_path, environ={})
            assert config.node.id == f"n{number}"
            assert config.gossip.enabled
            assert config.gossip.bind == mesh.gossip_address
            assert config.gossip.seeds == ([] if number == 1 else [seed])
            assert config.gossip.key_file == str(cluster.key_file)
            assert config.gossip.probe_interval_s == PROBE_INTERVAL_S
            assert mesh.spec.start_router == (number == 1)
    finally:
        await cluster.stop()

"""The operator CLI (`infermesh nodes|models|events` as a subprocess) against real processes: two
nodes joined by gossip, each with an agent serving the Control API over mutual TLS and one
emulated vLLM replica, and a router on n1.

An operator drains a node: new requests avoid it while a stream already running there completes.
A pin sends all traffic to the pinned node. A LoRA adapter loaded through n1 on n2's vLLM (the
call is forwarded) shows up as `loaded` and then `unloaded` in n2's events.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import openai
import pytest

from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.dev.cluster import LocalCluster, cluster_specs
from infermesh.dev.harness import free_port, infermesh_command
from infermesh.dev.loadgen import replica_tag_of

from .conftest import MODEL

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NODES = ("n1", "n2")
REPLICA = {node: f"{node}-r0" for node in NODES}
GOSSIP_OPTIONS: tuple[tuple[str, float], ...] = (
    ("probe_interval_s", 0.3),
    ("probe_timeout_s", 0.2),
    ("gossip_interval_s", 0.1),
    ("push_pull_interval_s", 2.0),
)
# The l4 profile decodes a token every ~37 ms: a 150-token stream stays in flight ~5.5 s, long
# enough to drain its node while it runs.
STREAM_TOKENS = 150
POLICY_DEADLINE_S = 15.0
CLI_TIMEOUT_S = 30.0
SAMPLE = 6


def _toml(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


@attrs.frozen
class Cli:
    """Runs `infermesh ...` as a subprocess with one user's certificate against one node."""

    pki: Path
    control: dict[str, str]
    env: dict[str, str]

    async def __call__(
        self, *args: str, node: str = "n1", user: str = "ops"
    ) -> tuple[int, str, str]:
        argv = [
            *infermesh_command(),
            *args,
            *("--endpoint", self.control[node]),
            *("--ca", str(self.pki / "ca.pem")),
            *("--cert", str(self.pki / f"{user}.pem")),
            *("--key", str(self.pki / f"{user}-key.pem")),
        ]
        with anyio.fail_after(CLI_TIMEOUT_S):
            done = await anyio.run_process(argv, check=False, env=self.env)
        return done.returncode, done.stdout.decode(), done.stderr.decode()

    async def ok(self, *args: str, node: str = "n1", user: str = "ops") -> str:
        code, out, err = await self(*args, node=node, user=user)
        assert code == 0, f"infermesh {' '.join(args)} exited {code}: {err}"
        return out

    async def json(self, *args: str, node: str = "n1", user: str = "ops") -> Any:
        return json.loads(await self.ok(*args, "--json", node=node, user=user))


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[LocalCluster, Cli]]:
    root = tmp_path_factory.mktemp("cli-e2e")
    pki = root / "certs"
    init_ca_dir(pki, days=2)
    for node in NODES:
        issue_to_dir(pki, Identity(node, "node"), hosts=["127.0.0.1"])
    issue_to_dir(pki, Identity("ops", "operator"))
    control = {node: f"127.0.0.1:{free_port()}" for node in NODES}
    specs = []
    for spec in cluster_specs(
        len(NODES), model=MODEL, profile="l4", poll_interval_s=0.2, ready_timeout_s=90.0
    ):
        node = spec.node_id
        extra = "\n".join(
            [
                "[control]",
                f"listen = {_toml(control[node])}",
                f"cert = {_toml(str(pki / f'{node}.pem'))}",
                f"key = {_toml(str(pki / f'{node}-key.pem'))}",
                f"ca = {_toml(str(pki / 'ca.pem'))}",
            ]
        )
        # Each agent keeps its local policy store under its own state directory.
        state = (("XDG_STATE_HOME", str(root / node / "state")),)
        specs.append(attrs.evolve(spec, extra_config=extra, env=state))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}
    env["XDG_CONFIG_HOME"] = str(root / "no-cli-config")
    async with LocalCluster(specs, gossip_options=GOSSIP_OPTIONS, secure=False) as cluster:
        cli = Cli(pki, control, env)
        await wait_until_both_nodes_listed(cli)
        yield cluster, cli


async def wait_until_both_nodes_listed(cli: Cli) -> None:
    """n1's agent knows both nodes and both replicas (gossip and state sync are done)."""
    deadline = time.monotonic() + POLICY_DEADLINE_S
    while True:
        listed = await cli.json("models", "list")
        models = {model["name"]: model for model in listed["models"]}
        nodes = {t["node"] for t in models.get(MODEL, {}).get("targets", []) if t["healthy"]}
        if nodes == set(NODES):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"n1 never saw healthy targets on both nodes: {listed}")
        await asyncio.sleep(0.2)


def client(cluster: LocalCluster) -> openai.AsyncOpenAI:
    url = cluster.node("n1").router_url
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def served_by(oai: openai.AsyncOpenAI, question: str) -> str:
    reply = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=2
    )
    return replica_tag_of(reply.id)


async def sample(oai: openai.AsyncOpenAI, label: str) -> collections.Counter[str]:
    """Which replicas served SAMPLE new requests, sent together."""
    tags = await asyncio.gather(*(served_by(oai, f"{label} {i}") for i in range(SAMPLE)))
    return collections.Counter(tags)


async def router_follows(cluster: LocalCluster, reply: dict[str, Any]) -> None:
    """Until n1's router has applied the policy revision of a CLI `--json` write reply (it polls
    its agent every second and logs each revision it applies)."""
    log = cluster.node("n1").workdir / "router.log"
    deadline = time.monotonic() + POLICY_DEADLINE_S
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if '"policy applied"' not in line:
                continue
            record = json.loads(line)
            if record.get("event") == "policy applied" and record["revision"] >= reply["revision"]:
                return
        if time.monotonic() > deadline:
            pytest.fail(f"n1's router never applied policy revision {reply['revision']}")
        await asyncio.sleep(0.1)


async def stream_rest(stream: Any) -> tuple[int, str | None, set[str]]:
    """Read a chat stream to its end: tokens received, the finish reason, replica tags."""
    tokens, finish, tags = 0, None, set()
    async for chunk in stream:
        tags.add(replica_tag_of(chunk.id))
        for choice in chunk.choices:
            if choice.delta.content:
                tokens += 1
            finish = choice.finish_reason or finish
    return tokens, finish, tags


async def test_drained_node_gets_no_new_requests_while_its_running_stream_completes(
    mesh: tuple[LocalCluster, Cli],
) -> None:
    cluster, cli = mesh
    async with client(cluster) as oai:
        await router_follows(cluster, await cli.json("nodes", "drain", "n1", "--reason", "warm-up"))
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "a long answer, please"}],
            max_tokens=STREAM_TOKENS,
            stream=True,
        )
        first = await stream.__anext__()
        assert replica_tag_of(first.id) == REPLICA["n2"]

        # n2 is drained while the stream runs on it; n1 takes new requests again.
        changes = await asyncio.gather(
            cli.json("nodes", "undrain", "n1"),
            cli.json("nodes", "drain", "n2", "--reason", "kernel upgrade"),
        )
        table = await cli.ok("nodes", "list")
        await router_follows(cluster, max(changes, key=lambda reply: reply["revision"]))
        landed = await sample(oai, "after the drain")
        tokens, finish, tags = await stream_rest(stream)
        await cli.ok("nodes", "undrain", "n2")

    assert landed == {REPLICA["n1"]: SAMPLE}
    assert tags == {REPLICA["n2"]}
    assert finish == "length"
    assert tokens + (1 if first.choices and first.choices[0].delta.content else 0) == (
        STREAM_TOKENS
    )
    rows = {line.split()[0]: line for line in table.splitlines()[1:3]}
    assert set(rows) == set(NODES)
    assert "yes (kernel upgrade)" in rows["n2"]
    assert " no " in rows["n1"]
    assert "policy store: local" in table


async def test_a_pinned_model_is_served_only_by_the_pinned_node(
    mesh: tuple[LocalCluster, Cli],
) -> None:
    cluster, cli = mesh
    async with client(cluster) as oai:
        await router_follows(cluster, await cli.json("models", "pin", MODEL, "n2"))
        pinned = await sample(oai, "pinned")
        described = await cli.json("models", "describe", MODEL)
        await cli.ok("models", "unpin", MODEL)

    assert pinned == {REPLICA["n2"]: SAMPLE}
    assert described["pinned_nodes"] == ["n2"]
    assert described["healthy_targets"] == 1  # n1's replica is outside the pin


async def test_a_lora_adapter_loaded_through_n1_on_n2_shows_in_n2s_events(
    mesh: tuple[LocalCluster, Cli],
) -> None:
    _, cli = mesh
    before: Sequence[dict[str, Any]] = [
        json.loads(line)
        for line in (await cli.ok("events", "--json", "--kind", "model", node="n2")).splitlines()
    ]
    after_seq = max((event["seq"] for event in before), default=0)

    loaded = await cli.json(
        "models", "load", "sql-lora", "--node", "n2", "--source", "/adapters/sql-lora"
    )
    unloaded = await cli.ok("models", "unload", "sql-lora", "--node", "n2")
    again, _, refused = await cli("models", "unload", "sql-lora", "--node", "n2")
    events = [
        json.loads(line)
        for line in (
            await cli.ok(
                "events", "--json", "--kind", "model", "--after", str(after_seq), node="n2"
            )
        ).splitlines()
    ]

    assert (loaded["node"], loaded["model"]) == ("n2", "sql-lora")
    assert loaded["runtime"] == cluster_replica_url(mesh[0], "n2")
    assert "unloaded sql-lora" in unloaded
    assert again == 3  # vLLM answers 404 for an adapter it does not have
    assert "sql-lora" in refused
    # The operations, recorded with who asked (the runtime's state changes carry no `by`).
    operations = [
        (event["action"], event["subject"], event["node"], event["attributes"]["by"])
        for event in events
        if "by" in event["attributes"]
    ]
    by = "spiffe://infermesh/operator/ops"
    assert operations == [
        ("loaded", "sql-lora", "n2", by),
        ("unloaded", "sql-lora", "n2", by),
        ("unload_failed", "sql-lora", "n2", by),
    ]


def cluster_replica_url(cluster: LocalCluster, node: str) -> str:
    (replica,) = cluster.node(node).replicas
    return replica.url

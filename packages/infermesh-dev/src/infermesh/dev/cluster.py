"""Several local nodes joined by gossip: one `LocalMesh` per node, all on loopback.

Node ids are n1..nN; each node has its own emulated replicas and agent, only node 1 runs a
router, every agent joins through node 1's gossip address, and all share one generated key file.
Starts and stops the nodes concurrently. Never routes, scores or gossips itself.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import attrs

from infermesh.dev.harness import (
    GossipSpec,
    GossipValue,
    LocalMesh,
    MeshSpec,
    ReplicaSpec,
    free_gossip_port,
)
from infermesh.dev.profiles import DEFAULT_MODEL

__all__ = ["LocalCluster", "cluster_specs", "fetch_members"]


def cluster_specs(
    nodes: int,
    *,
    model: str = DEFAULT_MODEL,
    models: Mapping[int, str] | None = None,
    profile: str = "h100",
    poll_interval_s: float = 0.5,
    log_level: str = "info",
    ready_timeout_s: float = 60.0,
) -> list[MeshSpec]:
    """`nodes` node specs n1..nN with one replica each (named `<node>-r0`), router on n1.

    `models` maps a 1-based node number to the model its replica serves (default: `model`).
    """
    if nodes < 1:
        raise ValueError(f"a cluster needs at least one node, got {nodes}")
    specs = []
    for number in range(1, nodes + 1):
        node_id = f"n{number}"
        specs.append(
            MeshSpec(
                replicas=(ReplicaSpec(profile, f"{node_id}-r0"),),
                model=(models or {}).get(number, model),
                node_id=node_id,
                poll_interval_s=poll_interval_s,
                log_level=log_level,
                ready_timeout_s=ready_timeout_s,
                start_router=number == 1,
            )
        )
    return specs


class LocalCluster:
    """Starts node specs as one gossip mesh; `async with LocalCluster(specs) as cluster:`.

    Every node gets a `[gossip]` table: a free port, node 1's address as its seed (node 1 has
    none), the shared key file (or plaintext when `secure` is false) and `gossip_options`.
    """

    def __init__(
        self,
        specs: Sequence[MeshSpec],
        *,
        gossip_options: Sequence[tuple[str, GossipValue]] = (),
        secure: bool = True,
        workdir: Path | None = None,
    ) -> None:
        ids = [spec.node_id for spec in specs]
        if not specs or len(set(ids)) != len(ids):
            raise ValueError(f"a cluster needs nodes with distinct ids, got {ids}")
        self._own_workdir = workdir is None
        self.keep_workdir = False
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="infermesh-cluster-"))
        self.key_file: Path | None = self.workdir / "gossip.key" if secure else None
        ports = [free_gossip_port() for _ in specs]
        seed = f"127.0.0.1:{ports[0]}"
        self.nodes: list[LocalMesh] = []
        for index, (spec, port) in enumerate(zip(specs, ports, strict=True)):
            gossip = GossipSpec(
                port=port,
                seeds=() if index == 0 else (seed,),
                key_file=self.key_file,
                options=tuple(gossip_options),
            )
            node_dir = self.workdir / spec.node_id
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(LocalMesh(attrs.evolve(spec, gossip=gossip), node_dir))

    def node(self, node_id: str) -> LocalMesh:
        for mesh in self.nodes:
            if mesh.spec.node_id == node_id:
                return mesh
        raise KeyError(f"no node {node_id!r} in this cluster")

    async def __aenter__(self) -> LocalCluster:
        try:
            await self.start()
        except BaseException:
            self.keep_workdir = True  # the node logs explain the failure
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Write the key file, then start every node at once (joins retry until a seed answers)."""
        if self.key_file is not None:
            from infermesh.agent.gossip.keyring import generate_key

            self.key_file.write_text(generate_key() + "\n")
            self.key_file.chmod(0o600)
        try:
            async with asyncio.TaskGroup() as group:
                for mesh in self.nodes:
                    group.create_task(mesh.start())
        except BaseExceptionGroup as failed:
            # The first node that failed (its MeshStartError carries its log tail); the task
            # group has cancelled the others' start-up.
            raise failed.exceptions[0] from None

    async def stop(self, grace_s: float = 6.0) -> None:
        await asyncio.gather(*(mesh.stop(grace_s) for mesh in self.nodes))
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def members(self, node_id: str) -> dict[str, str]:
        """Member id -> state ("alive", "suspect", "dead", "left") as `node_id`'s agent sees it."""
        body = await fetch_members(self.node(node_id).agent_http_url)
        return {member["node"]: member["state"] for member in body["members"]}


async def fetch_members(agent_http_url: str, timeout_s: float = 2.0) -> dict[str, Any]:
    """GET `<agent>/gossip/members`: {"node": self id, "members": [{"node", "state", ...}]}."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{agent_http_url}/gossip/members") as resp,
    ):
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
        return body

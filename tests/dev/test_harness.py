"""The local-mesh harness: its generated config, emulator processes, readiness and failures."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest

from infermesh.core.config import load_config
from infermesh.dev.harness import (
    LocalMesh,
    MeshSpec,
    MeshStartError,
    ReplicaSpec,
    RunningReplica,
    free_port,
    mesh_spec,
    render_config,
)


def test_generated_config_is_valid_for_agent_and_router(tmp_path: Path) -> None:
    spec = mesh_spec(replicas=3, profiles=["h100", "a10"], model="m", log_level="debug")
    replicas = [RunningReplica(spec=r, port=9001 + i) for i, r in enumerate(spec.replicas)]
    path = tmp_path / "infermesh.toml"
    path.write_text(
        render_config(
            spec,
            replicas,
            socket_path=tmp_path / "agent.sock",
            agent_metrics_port=9464,
            router_port=8088,
        )
    )

    config = load_config(path, environ={})

    assert config.node.id == "dev-node"
    assert config.agent.socket == str(tmp_path / "agent.sock")
    assert config.agent.metrics_listen == "127.0.0.1:9464"
    assert config.router.listen == "127.0.0.1:8088"
    assert config.agent_target() == f"unix://{tmp_path / 'agent.sock'}"
    assert config.logging.level == "debug"
    assert [(r.kind, r.name, r.url) for r in config.runtimes] == [
        ("vllm", "h100-0", "http://127.0.0.1:9001"),
        ("vllm", "a10-1", "http://127.0.0.1:9002"),
        ("vllm", "h100-2", "http://127.0.0.1:9003"),
    ]


def test_mesh_specs_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown GPU profile 'v100'"):
        ReplicaSpec(profile="v100", name="x")
    with pytest.raises(ValueError, match="at least one replica"):
        MeshSpec(replicas=())
    with pytest.raises(ValueError, match="names must be unique"):
        MeshSpec(replicas=(ReplicaSpec("h100", "a"), ReplicaSpec("a10", "a")))
    with pytest.raises(ValueError, match="router needs the agent"):
        MeshSpec(replicas=(ReplicaSpec("h100", "a"),), start_agent=False)


@pytest.mark.anyio
async def test_emulator_processes_start_healthy_and_stop(tmp_path: Path) -> None:
    spec = MeshSpec(
        replicas=(ReplicaSpec("h100", "fast"), ReplicaSpec("instant", "bench")),
        start_agent=False,
        start_router=False,
        ready_timeout_s=60,
    )
    async with LocalMesh(spec, workdir=tmp_path) as mesh, aiohttp.ClientSession() as session:
        assert mesh.exited() is None
        for replica in mesh.replicas:
            async with session.get(f"{replica.url}/v1/models") as resp:
                assert resp.status == 200
        body = {"model": spec.model, "prompt": "x", "max_tokens": 2}
        async with session.post(f"{mesh.replicas[0].url}/v1/completions", json=body) as resp:
            assert (await resp.json())["id"].startswith("cmpl-fast-")
        processes = list(mesh.processes)
    assert all(p.returncode is not None for p in processes)
    assert (tmp_path / "vllm-fast.log").exists()


@pytest.mark.anyio
async def test_a_replica_that_cannot_start_fails_with_its_log_lines(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        spec = MeshSpec(
            replicas=(ReplicaSpec("a10", "busy", port=port),),
            start_agent=False,
            start_router=False,
        )
        with pytest.raises(MeshStartError) as caught:
            async with LocalMesh(spec, workdir=tmp_path):
                pass

    message = str(caught.value)
    assert caught.value.process == "emulator busy"
    assert "exited before" in message
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert "last" in message
    assert "log lines of emulator busy" in message

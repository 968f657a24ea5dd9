"""The one-node policy store: acknowledged writes survive a restart; bad input changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infermesh.agent.policy.local import DOCUMENT_NAME, LocalPolicyStore
from infermesh.core.plugins import PluginHost
from infermesh.core.policy import (
    DrainNode,
    Pin,
    PolicyError,
    PolicyKind,
    PolicySet,
    PolicyStoreContext,
    SetPolicy,
    UndrainNode,
)

pytestmark = pytest.mark.anyio


def store_in(data_dir: Path) -> LocalPolicyStore:
    return LocalPolicyStore(PolicyStoreContext(node="n1", data_dir=str(data_dir)))


async def test_committed_policy_survives_a_restart(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    await store.start()
    await store.submit(SetPolicy(PolicyKind.PINS, "llama", Pin(("gpu-1", "gpu-2"), 1)))
    await store.submit(DrainNode("gpu-2", "maintenance", 1700000000.0))
    await store.aclose()

    again = store_in(tmp_path)
    await again.start()
    policy = await again.get()
    assert policy.revision == 2
    assert policy.pins["llama"] == Pin(("gpu-1", "gpu-2"), 1)
    assert policy.drains["gpu-2"].reason == "maintenance"
    assert PolicySet.from_document(json.loads((tmp_path / DOCUMENT_NAME).read_text())) == policy
    await again.aclose()


async def test_a_rejected_command_changes_neither_memory_nor_disk(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    await store.start()
    await store.submit(DrainNode("gpu-1"))
    with pytest.raises(PolicyError, match=r"drains\['gpu-9'\]: node is not drained"):
        await store.submit(UndrainNode("gpu-9"))
    assert (await store.get()).revision == 1
    assert json.loads((tmp_path / DOCUMENT_NAME).read_text())["revision"] == 1
    await store.aclose()


async def test_watch_yields_the_current_policy_then_each_change(tmp_path: Path) -> None:
    store = store_in(tmp_path)
    await store.start()
    seen: list[int] = []
    watch = store.watch()
    seen.append((await anext(watch)).revision)
    await store.submit(DrainNode("gpu-1"))
    seen.append((await anext(watch)).revision)
    await store.aclose()
    assert [p.revision async for p in watch] == []
    assert seen == [0, 1]


async def test_a_corrupt_document_is_reported_with_its_path(tmp_path: Path) -> None:
    (tmp_path / DOCUMENT_NAME).write_text('{"pins": {"m": {"min_replicas": -1, "nodes": ["a"]}}}')
    with pytest.raises(PolicyError, match=r"policy\.json: pins\['m'\]\.min_replicas: must be >= 0"):
        await store_in(tmp_path).start()


def test_the_agent_plugin_registers_the_local_raft_and_remote_stores() -> None:
    host = PluginHost.load(allow=["agent"])
    assert sorted(host.policy_stores()) == ["local", "raft", "remote"]
    assert host.registrations()["policy stores"] == {
        "local": "agent",
        "raft": "agent",
        "remote": "agent",
    }

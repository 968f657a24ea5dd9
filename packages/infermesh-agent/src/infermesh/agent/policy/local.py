"""A one-node policy store: the policy document in `policy.json` under the agent's data dir.

For an agent with no `[raft]` section. Every accepted command rewrites the document atomically
(temporary file, fsync, rename, fsync of the directory) before it is acknowledged, so an
acknowledged write survives a crash or power loss. Never blocks the event loop: file I/O runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from infermesh.agent.policy.broadcast import PolicyBroadcast
from infermesh.core.policy import (
    PolicyCommand,
    PolicyError,
    PolicySet,
    PolicyStoreContext,
    PolicyStoreStatus,
)

__all__ = ["DOCUMENT_NAME", "LocalPolicyStore", "read_document", "write_document_atomically"]

DOCUMENT_NAME = "policy.json"


def write_document_atomically(path: Path, document: dict[str, Any]) -> None:
    """Replace `path` with `document` so that a reader sees the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_document(path: Path) -> PolicySet:
    """The policy stored at `path`; an empty set when there is none yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PolicySet()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path}: not a JSON policy document ({exc})") from None
    try:
        return PolicySet.from_document(document)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


class LocalPolicyStore:
    """`PolicyStore` for a single agent: linearizable because there is one writer, this one."""

    def __init__(self, context: PolicyStoreContext) -> None:
        self.path = Path(context.data_dir) / DOCUMENT_NAME
        self._broadcast = PolicyBroadcast()
        self._write_lock = asyncio.Lock()

    async def start(self) -> None:
        self._broadcast.publish(await asyncio.to_thread(read_document, self.path))

    async def get(self) -> PolicySet:
        return self._broadcast.policy

    async def submit(self, command: PolicyCommand) -> PolicySet:
        async with self._write_lock:
            updated = self._broadcast.policy.apply(command)
            await asyncio.to_thread(write_document_atomically, self.path, updated.to_document())
            self._broadcast.publish(updated)
            return updated

    def watch(self) -> AsyncIterator[PolicySet]:
        return self._broadcast.watch()

    async def status(self) -> PolicyStoreStatus:
        return PolicyStoreStatus("single", None, (), self._broadcast.policy.revision)

    async def aclose(self) -> None:
        self._broadcast.close()

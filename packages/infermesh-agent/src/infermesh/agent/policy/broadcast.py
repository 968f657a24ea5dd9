"""The latest PolicySet of one store and its watchers: a version counter and an asyncio.Event.

Loop-side only: backends whose state changes on another thread hand values over with
`loop.call_soon_threadsafe(broadcast.publish, policy)`. Never blocks and never drops the newest.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from infermesh.core.policy import PolicySet


class PolicyBroadcast:
    """Holds the newest PolicySet; `watch()` yields it and then every newer one.

    A slow watcher skips intermediate revisions and always ends on the newest, which is what a
    consumer of policy (the scoring engine, an event stream) needs.
    """

    def __init__(self, policy: PolicySet | None = None) -> None:
        self._policy = policy or PolicySet()
        self._changed = asyncio.Event()
        self._closed = False

    @property
    def policy(self) -> PolicySet:
        return self._policy

    def publish(self, policy: PolicySet) -> None:
        """Make `policy` current when it is newer than what is held (older ones are ignored)."""
        if policy.revision < self._policy.revision or policy == self._policy:
            return
        self._policy = policy
        self._wake()

    def close(self) -> None:
        """End every `watch()` after it has yielded the newest policy."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for_revision(self, revision: int) -> PolicySet:
        """Return once the held policy has reached `revision` (callers bound it with a timeout)."""
        while self._policy.revision < revision and not self._closed:
            await self._changed.wait()
        return self._policy

    async def watch(self) -> AsyncIterator[PolicySet]:
        seen: PolicySet | None = None
        while True:
            current = self._policy
            if current is not seen:
                seen = current
                yield current
                continue
            if self._closed:
                return
            await self._changed.wait()

"""The replicated policy store: PySyncObj Raft with its tick thread bridged to asyncio.

Commands travel in the Raft log as JSON bytes (`command_to_document`), never as pickled objects,
and are validated again when applied, so every voter computes the same PolicySet. PySyncObj
still pickles its own messages, so a cluster of more than one voter must have a password
(Fernet encryption); this module refuses to build one without it. Nothing here blocks the loop:
the SyncObj is created in a worker thread and results come back through
`loop.call_soon_threadsafe` from replicated-call callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from pysyncobj import (  # type: ignore[import-untyped]
    FAIL_REASON,
    SyncObj,
    SyncObjConf,
    SyncObjConsumer,
    replicated,
)

from infermesh.agent.policy.broadcast import PolicyBroadcast
from infermesh.core.policy import (
    DrainNode,
    NotLeaderError,
    PolicyCommand,
    PolicyError,
    PolicySet,
    PolicyStoreContext,
    PolicyStoreStatus,
    SetPolicy,
    command_from_document,
    command_to_document,
)

__all__ = ["JOURNAL_NAME", "SNAPSHOT_NAME", "RaftOptions", "RaftPolicyStore"]

JOURNAL_NAME = "raft.journal"
SNAPSHOT_NAME = "raft.dump"

_ROLES = {0: "follower", 1: "candidate", 2: "leader"}
_FAILURES = {
    FAIL_REASON.QUEUE_FULL: "the command queue is full",
    FAIL_REASON.MISSING_LEADER: "no leader is known (is a quorum of voters up?)",
    FAIL_REASON.DISCARDED: "the write was discarded by a new leader",
    FAIL_REASON.NOT_LEADER: "this node lost leadership",
    FAIL_REASON.LEADER_CHANGED: "the leader changed before the write committed",
    FAIL_REASON.REQUEST_DENIED: "the leader denied the request",
}


@attrs.frozen
class RaftOptions:
    """The `[raft]` table of an agent's config, checked."""

    listen: str
    """This voter's Raft address `host:port`, as the other voters dial it."""
    voters: tuple[str, ...]
    """Every voter's Raft address, this one included (1, 3 or 5 of them)."""
    password: str | None = None
    """Shared secret encrypting Raft traffic; required with more than one voter."""
    election_timeout_s: tuple[float, float] = (1.0, 3.0)
    heartbeat_s: float = 0.1
    commit_timeout_s: float = 5.0
    """How long `submit` waits for a commit before raising NotLeaderError."""
    snapshot_after_entries: int = 1000
    """Write a full snapshot (`raft.dump`) and truncate the journal past this many entries."""
    snapshot_after_s: float = 300.0
    """... or when this long has passed since the last snapshot."""

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> RaftOptions:
        """Read options as written in config; errors name the `raft.` key."""
        listen = options.get("listen")
        if not isinstance(listen, str) or ":" not in listen:
            raise PolicyError(f"raft.listen: must be 'host:port', got {listen!r}")
        voters_raw = options.get("voters", [listen])
        if not isinstance(voters_raw, list | tuple) or not all(
            isinstance(v, str) and ":" in v for v in voters_raw
        ):
            raise PolicyError(f"raft.voters: must be a list of 'host:port', got {voters_raw!r}")
        voters = tuple(voters_raw)
        if listen not in voters:
            raise PolicyError(
                f"raft.voters: must include this voter's raft.listen {listen!r}, got {voters!r}"
            )
        if len(set(voters)) != len(voters):
            raise PolicyError(f"raft.voters: names a voter twice: {voters!r}")
        password = options.get("password") or None
        if password is not None and not isinstance(password, str):
            raise PolicyError("raft.password: must be a string")
        if len(voters) > 1 and password is None:
            raise PolicyError(
                f"raft.password: required with {len(voters)} voters (Raft messages are pickled; "
                "the password encrypts and authenticates them); set raft.password or "
                "raft.password_file on every voter"
            )
        timeouts = options.get("election_timeout_s", (1.0, 3.0))
        if (
            not isinstance(timeouts, list | tuple)
            or len(timeouts) != 2
            or not 0 < float(timeouts[0]) < float(timeouts[1])
        ):
            raise PolicyError(f"raft.election_timeout_s: must be [min, max], got {timeouts!r}")
        heartbeat = float(options.get("heartbeat_s", 0.1))
        if not 0 < heartbeat < float(timeouts[0]):
            raise PolicyError(
                f"raft.heartbeat_s: must be > 0 and below the election timeout, got {heartbeat!r}"
            )
        commit_timeout = float(options.get("commit_timeout_s", 5.0))
        if commit_timeout <= 0:
            raise PolicyError(f"raft.commit_timeout_s: must be > 0, got {commit_timeout!r}")
        snapshot_entries = options.get("snapshot_after_entries", 1000)
        if isinstance(snapshot_entries, bool) or not isinstance(snapshot_entries, int):
            raise PolicyError(
                f"raft.snapshot_after_entries: must be an integer, got {snapshot_entries!r}"
            )
        if snapshot_entries < 2:
            raise PolicyError(
                f"raft.snapshot_after_entries: must be >= 2, got {snapshot_entries!r}"
            )
        snapshot_s = float(options.get("snapshot_after_s", 300.0))
        if snapshot_s <= 0:
            raise PolicyError(f"raft.snapshot_after_s: must be > 0, got {snapshot_s!r}")
        return cls(
            listen,
            voters,
            password,
            (float(timeouts[0]), float(timeouts[1])),
            heartbeat,
            commit_timeout,
            snapshot_entries,
            snapshot_s,
        )


class _PolicyLog(SyncObjConsumer):  # type: ignore[misc]
    """The replicated state machine: the policy document, changed only by `apply_command`.

    Runs on the PySyncObj tick thread. Its snapshot is the JSON document (a str), so the dump
    file never holds our classes. A command that fails validation leaves the state unchanged and
    answers with its error: every voter rejects it the same way.
    """

    def __init__(self, on_applied: Callable[[PolicySet], None]) -> None:
        self._on_applied = on_applied
        super().__init__()
        self.policy = PolicySet()

    @replicated  # type: ignore[untyped-decorator]
    def apply_command(self, payload: bytes) -> dict[str, Any]:
        try:
            command = command_from_document(json.loads(payload))
            self.policy = self.policy.apply(command)
        except (PolicyError, ValueError) as exc:
            return {"error": str(exc)}
        self._on_applied(self.policy)
        return {"revision": self.policy.revision}

    def _serialize(self) -> str:
        return json.dumps(self.policy.to_document(), sort_keys=True)

    def _deserialize(self, data: str) -> None:
        self.policy = PolicySet.from_document(json.loads(data))
        self._on_applied(self.policy)


class RaftPolicyStore:
    """`PolicyStore` replicated over PySyncObj; any voter accepts writes (followers forward)."""

    def __init__(self, context: PolicyStoreContext) -> None:
        self.options = RaftOptions.from_mapping(context.options)
        self.data_dir = Path(context.data_dir)
        self._broadcast = PolicyBroadcast()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = _PolicyLog(self._applied_on_tick_thread)
        self._sync: Any = None

    # ------------------------------------------------------------------ tick-thread side

    def _applied_on_tick_thread(self, policy: PolicySet) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed after the check
            loop.call_soon_threadsafe(self._broadcast.publish, policy)

    def _conf(self) -> Any:
        low, high = self.options.election_timeout_s
        return SyncObjConf(
            password=self.options.password,
            journalFile=str(self.data_dir / JOURNAL_NAME),
            fullDumpFile=str(self.data_dir / SNAPSHOT_NAME),
            raftMinTimeout=low,
            raftMaxTimeout=high,
            appendEntriesPeriod=self.options.heartbeat_s,
            connectionRetryTime=min(1.0, low),
            connectionTimeout=max(high, 1.0),
            logCompactionMinEntries=self.options.snapshot_after_entries,
            logCompactionMinTime=self.options.snapshot_after_s,
            useFork=False,  # never fork a process that runs asyncio, gRPC and threads
            commandsWaitLeader=True,
        )

    def _create(self) -> Any:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        partners = [v for v in self.options.voters if v != self.options.listen]
        return SyncObj(self.options.listen, partners, self._conf(), consumers=[self._log])

    # ------------------------------------------------------------------ loop side

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # SyncObj.__init__ starts the tick thread and waits for it: never on the loop.
        self._sync = await asyncio.to_thread(self._create)

    async def get(self) -> PolicySet:
        return self._broadcast.policy

    async def submit(self, command: PolicyCommand) -> PolicySet:
        if self._sync is None or self._loop is None:
            raise NotLeaderError("the raft policy store is not started")
        if isinstance(command, SetPolicy | DrainNode):
            # Reject an invalid value before it is logged. Commands that depend on existing
            # entries (delete, undrain) are judged only when applied: this copy may trail.
            PolicySet().apply(command)
        payload = json.dumps(command_to_document(command), sort_keys=True).encode()
        answer: asyncio.Future[tuple[Any, int]] = self._loop.create_future()

        def settle(result: Any, error: int) -> None:  # on the tick thread
            loop = self._loop
            if loop is None or loop.is_closed():
                return

            def resolve() -> None:
                if not answer.done():
                    answer.set_result((result, error))

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve)

        self._log.apply_command(payload, callback=settle)
        timeout = self.options.commit_timeout_s
        try:
            result, error = await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise NotLeaderError(
                f"the write was not committed within {timeout:g} s (no quorum of "
                f"{len(self.options.voters)} voters?)"
            ) from None
        if error != FAIL_REASON.SUCCESS:
            raise NotLeaderError(f"the write failed: {_FAILURES.get(error, f'reason {error}')}")
        if "error" in result:
            raise PolicyError(result["error"])
        return await asyncio.wait_for(
            self._broadcast.wait_for_revision(int(result["revision"])), timeout
        )

    def watch(self) -> AsyncIterator[PolicySet]:
        return self._broadcast.watch()

    async def status(self) -> PolicyStoreStatus:
        revision = self._broadcast.policy.revision
        if self._sync is None:
            return PolicyStoreStatus("stopped", None, self.options.voters, revision)
        raw = self._sync.getStatus()
        leader = raw.get("leader")
        role = _ROLES.get(int(raw.get("state", 0)), "follower")
        return PolicyStoreStatus(
            role, None if leader is None else str(leader.id), self.options.voters, revision
        )

    async def aclose(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            await asyncio.to_thread(sync.destroy_synchronous)
        self._broadcast.close()

    @property
    def voters(self) -> Sequence[str]:
        return self.options.voters

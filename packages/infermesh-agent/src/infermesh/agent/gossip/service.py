"""The anyio shell around `GossipNode`: timers, joining seeds, store changes, key reloads, leave.

It only wakes the node up and hands its bytes to the `Transport` (the sockets); every gossip rule
lives in the sans-I/O node. All node calls happen on the event loop (one writer), never threads.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import TaskGroup, TaskStatus

from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.keyring import Keyring
from infermesh.agent.gossip.members import MemberEvent
from infermesh.agent.gossip.node import GossipCounters, GossipNode, MemberInfo, NodeSettings, Send
from infermesh.agent.gossip.statesync import StateBook
from infermesh.agent.gossip.transport import Transport, join_host_port
from infermesh.agent.gossip.values import NodeMeta
from infermesh.core.config import parse_host_port
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuStateDelta, ModelStateDelta
from infermesh.core.scoring.state import StateStore, Subscription

__all__ = ["GossipService", "GossipSettings"]

log = get_logger("infermesh.agent.gossip")

LEAVE_TIMEOUT_S = 1.0  # how long a cancelled service spends telling others it leaves
JOIN_BACKOFF_S = (0.5, 10.0)  # first and longest wait between join attempts
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@attrs.frozen
class GossipSettings:
    """Everything the service needs; `key_file` None requires `insecure` (plaintext gossip)."""

    node_id: str
    bind: str
    advertise: str
    seeds: tuple[str, ...]
    key_file: Path | None
    insecure: bool
    swim: SwimConfig
    meta: NodeMeta
    inject_loss: float = 0.0
    key_reload_s: float = 1.0

    def __attrs_post_init__(self) -> None:
        if self.key_file is None and not self.insecure:
            raise ValueError(
                "gossip needs a key file (gossip.key_file) unless gossip.insecure = true"
            )
        parse_host_port(self.bind)
        if self.advertise:
            parse_host_port(self.advertise)
        elif parse_host_port(self.bind)[0] in _WILDCARD_HOSTS:
            raise ValueError(
                f"gossip.bind {self.bind!r} is a wildcard address: set gossip.advertise to an "
                "address other nodes can reach"
            )
        for seed in self.seeds:
            parse_host_port(seed)


class GossipService:
    """Runs one gossip node on real sockets until cancelled."""

    def __init__(
        self,
        settings: GossipSettings,
        store: StateStore,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._keyring: Keyring | None = None
        self._key_file_version: tuple[int, int] | None = None  # (mtime_ns, size) loaded
        if settings.key_file is not None:
            stat = settings.key_file.stat()
            self._key_file_version = (stat.st_mtime_ns, stat.st_size)
            self._keyring = Keyring.from_file(settings.key_file)
        self._node: GossipNode | None = None
        self._transport: Transport | None = None
        self._task_group: TaskGroup | None = None
        self._wakeup = anyio.Event()
        self._listeners: list[Callable[[MemberEvent], None]] = []
        self.address = ""
        self.joined = anyio.Event()

    # ----------------------------------------------------------------- read side
    @property
    def node(self) -> GossipNode:
        if self._node is None:
            raise RuntimeError("GossipService.node is only available once run() has started")
        return self._node

    @property
    def keyring(self) -> Keyring | None:
        return self._keyring

    @property
    def counters(self) -> GossipCounters:
        return GossipCounters() if self._node is None else self._node.counters

    def members(self) -> list[MemberInfo]:
        return [] if self._node is None else self._node.members()

    def rtt_s(self, node: str) -> float | None:
        return None if self._node is None else self._node.rtt_s(node)

    def subscribe(self, callback: Callable[[MemberEvent], None]) -> None:
        """Call `callback(event)` for every member event, on the event loop."""
        self._listeners.append(callback)

    # ------------------------------------------------------------------- running
    async def run(
        self, *, task_status: TaskStatus[GossipService] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with await Transport.bind(self.settings.bind, self._count_drop) as transport:
            self.address = self._advertised(transport.host, transport.port)
            if self.settings.insecure:
                log.warning(
                    "gossip is not encrypted (gossip.insecure = true): anyone who can reach "
                    f"{self.address} can read and forge membership and state"
                )
            now = self._clock()
            book = StateBook(self.settings.node_id, self.store, epoch=int(now * 1000))
            node_settings = NodeSettings(
                node_id=self.settings.node_id,
                address=self.address,
                swim=self.settings.swim,
                meta=self.settings.meta,
                keyring=self._keyring,
                inject_loss=self.settings.inject_loss,
            )
            self._node = GossipNode(node_settings, book, self._rng, now)
            self._transport = transport
            subscriptions = self._watch_store()
            log.info("gossip listening", node=self.settings.node_id, address=self.address)
            try:
                await self._serve(transport, task_status)
            finally:
                for subscription in subscriptions:
                    subscription.close()

    async def _serve(self, transport: Transport, task_status: TaskStatus[GossipService]) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(transport.receive_datagrams, self._on_datagram)
                tg.start_soon(transport.write_datagrams)
                tg.start_soon(transport.serve_streams, self._on_stream)
                tg.start_soon(self._run_timers)
                tg.start_soon(self._join)
                if self.settings.key_file is not None:
                    tg.start_soon(self._watch_key_file, self.settings.key_file)
                task_status.started(self)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(LEAVE_TIMEOUT_S):
                await self._leave()

    def _advertised(self, bind_host: str, port: int) -> str:
        if not self.settings.advertise:
            return join_host_port(bind_host, port)
        host, advertised_port = parse_host_port(self.settings.advertise)
        return join_host_port(host, advertised_port or port)

    def _watch_store(self) -> list[Subscription[ModelStateDelta] | Subscription[GpuStateDelta]]:
        """Gossip every change of this node's own states (and those it has now)."""
        node_id = self.settings.node_id

        def on_model(delta: ModelStateDelta) -> None:
            state = self.store.get_model(delta.key)
            if delta.key.node == node_id and state is not None:
                self.node.publish(self._clock(), state)
                self._wakeup.set()

        def on_gpu(delta: GpuStateDelta) -> None:
            state = self.store.get_gpu(delta.key)
            if delta.key.node == node_id and state is not None:
                self.node.publish(self._clock(), state)
                self._wakeup.set()

        now = self._clock()
        for model in self.store.model_states():
            if model.key.node == node_id:
                self.node.publish(now, model)
        for gpu in self.store.gpu_states():
            if gpu.key.node == node_id:
                self.node.publish(now, gpu)
        return [self.store.subscribe_models(on_model), self.store.subscribe_gpus(on_gpu)]

    # ------------------------------------------------------------------ inputs
    def _on_datagram(self, data: bytes, source: str) -> None:
        self._dispatch(self.node.on_datagram(self._clock(), data, source))

    def _on_stream(self, data: bytes, source: str) -> bytes | None:
        """One inbound TCP message; the reply to send back, if the node has one."""
        reply, sends = self.node.on_stream(self._clock(), data, source)
        self._dispatch(sends)
        return reply

    def _count_drop(self, reason: str) -> None:
        self.node.counters.drop(reason)

    # ----------------------------------------------------------------- outputs
    def _dispatch(self, sends: Sequence[Send]) -> None:
        """After a node call: report its events, re-arm the timer and queue what it sends
        (datagrams to the socket writer, TCP messages in tasks of their own)."""
        self._emit_events()
        self._wakeup.set()
        for send in sends:
            if send.stream:
                assert self._task_group is not None
                self._task_group.start_soon(self._exchange, send)
                continue
            assert self._transport is not None
            self._transport.queue_datagram(send.address, send.data)

    async def _exchange(self, send: Send) -> bool:
        """Send one TCP message; feed the reply, if any, back to the node. True if one came."""
        assert self._transport is not None
        reply = await self._transport.exchange(send.address, send.data)
        if reply is None:
            return False
        _, sends = self.node.on_stream(self._clock(), reply, send.address)
        self._dispatch(sends)
        return True

    # ------------------------------------------------------------------ timers
    async def _run_timers(self) -> None:
        while True:
            wait_s = self.node.next_deadline_s - self._clock()
            if wait_s > 0:
                self._wakeup = anyio.Event()
                with anyio.move_on_after(wait_s):
                    await self._wakeup.wait()
                continue
            self._dispatch(self.node.tick(self._clock()))
            await anyio.lowlevel.checkpoint()

    async def _join(self) -> None:
        """Push-pull with the seeds until one answers (none: we are the first node)."""
        backoff_s = JOIN_BACKOFF_S[0]
        while self.settings.seeds:
            assert self._transport is not None
            addresses = await self._transport.resolve_seeds(self.settings.seeds)
            sends = self.node.join(self._clock(), addresses)
            self._emit_events()
            if not sends and addresses:
                break  # every seed is this node itself
            answered = False
            async with anyio.create_task_group() as attempts:

                async def attempt(send: Send) -> None:
                    nonlocal answered
                    if await self._exchange(send):
                        answered = True

                for send in sends:
                    attempts.start_soon(attempt, send)
            if answered:
                break
            log.warning(
                "gossip join failed; retrying",
                seeds=list(self.settings.seeds),
                retry_in_s=backoff_s,
            )
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, JOIN_BACKOFF_S[1])
        self.joined.set()
        log.info("gossip joined", node=self.settings.node_id, members=len(self.members()))

    async def _watch_key_file(self, path: Path) -> None:
        """Reload the keyring when the key file changes; a bad file keeps the old keys."""
        while True:
            await anyio.sleep(self.settings.key_reload_s)
            try:
                stat = await anyio.Path(path).stat()
                version = (stat.st_mtime_ns, stat.st_size)
                if version == self._key_file_version:
                    continue
                self._key_file_version = version  # a bad file is reported once per change
                keyring = await anyio.to_thread.run_sync(Keyring.from_file, path)
            except (OSError, ValueError) as exc:
                log.error(
                    "gossip key file not reloaded; keeping the old keys",
                    path=str(path),
                    error=str(exc),
                )
                continue
            self._keyring = keyring
            self.node.keyring = keyring
            log.info("gossip keys reloaded", path=str(path), keys=len(keyring.keys))

    async def _leave(self) -> None:
        """Tell the cluster we leave (a few gossip rounds), bounded by the caller."""
        transport = self._transport
        if self._node is None or transport is None:
            return
        for send in self.node.leave(self._clock()):
            if not send.stream:
                await transport.send_datagram(send.address, send.data)
        self._emit_events()
        for _ in range(3):
            await anyio.sleep(max(0.0, self.node.next_deadline_s - self._clock()))
            for send in self.node.tick(self._clock()):
                if not send.stream:
                    await transport.send_datagram(send.address, send.data)
            self._emit_events()

    def _emit_events(self) -> None:
        for event in self.node.drain_events():
            log.info(
                "gossip member",
                kind=event.kind,
                member=event.member_id,
                incarnation=event.incarnation,
            )
            for listener in tuple(self._listeners):
                listener(event)

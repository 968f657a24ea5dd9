"""The anyio shell around `GossipNode`: UDP and TCP on one port, timers, seeds, key reloads.

It only moves bytes and wakes the node up; every gossip rule lives in the sans-I/O node. All node
calls happen on the event loop (one writer), never from threads.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import attrs
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus, UDPSocket
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from infermesh.agent.gossip.codec import MAX_STREAM_BYTES
from infermesh.agent.gossip.config import SwimConfig
from infermesh.agent.gossip.keyring import SEAL_OVERHEAD, Keyring
from infermesh.agent.gossip.members import MemberEvent
from infermesh.agent.gossip.node import GossipCounters, GossipNode, MemberInfo, NodeSettings, Send
from infermesh.agent.gossip.statesync import StateBook
from infermesh.agent.gossip.values import NodeMeta
from infermesh.core.config import parse_host_port
from infermesh.core.logging import get_logger
from infermesh.core.model import GpuStateDelta, ModelStateDelta
from infermesh.core.scoring.state import StateStore, Subscription

__all__ = ["GossipService", "GossipSettings"]

log = get_logger("infermesh.agent.gossip")

STREAM_TIMEOUT_S = 5.0  # one TCP exchange (connect, request, reply) must finish by then
MAX_INBOUND_STREAMS = 64  # TCP connections served at once; more are closed at once (counted)
OUTBOX_DATAGRAMS = 4096  # datagrams queued for sending; more are dropped (counted)
LEAVE_TIMEOUT_S = 1.0  # how long a cancelled service spends telling others it leaves
JOIN_BACKOFF_S = (0.5, 10.0)  # first and longest wait between join attempts
_MAX_STREAM_FRAME = MAX_STREAM_BYTES + SEAL_OVERHEAD
_BIND_ATTEMPTS = 8
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
        self._udp: UDPSocket | None = None
        self._task_group: TaskGroup | None = None
        self._outbox: MemoryObjectSendStream[Send] | None = None  # to the UDP writer task
        self._wakeup = anyio.Event()
        self._listeners: list[Callable[[MemberEvent], None]] = []
        self._resolved: dict[str, tuple[str, float]] = {}
        self._inbound_streams = 0
        self._family = socket.AF_UNSPEC  # the UDP socket's, once bound: peers must match it
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
        udp, tcp = await self._bind()
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
        self._udp = udp
        subscriptions = self._watch_store()
        log.info("gossip listening", node=self.settings.node_id, address=self.address)
        # Datagrams wait here for the one task that writes to the UDP socket.
        self._outbox, outbox_reader = anyio.create_memory_object_stream[Send](OUTBOX_DATAGRAMS)
        try:
            with tcp, self._outbox, outbox_reader:
                await self._serve(udp, tcp, outbox_reader, task_status)
        finally:
            for subscription in subscriptions:
                subscription.close()

    async def _serve(
        self,
        udp: UDPSocket,
        tcp: socket.socket,
        outbox: MemoryObjectReceiveStream[Send],
        task_status: TaskStatus[GossipService],
    ) -> None:
        async with udp:
            try:
                async with anyio.create_task_group() as tg:
                    self._task_group = tg
                    tg.start_soon(self._receive_datagrams, udp)
                    tg.start_soon(self._send_datagrams, outbox)
                    tg.start_soon(self._accept_streams, tcp)
                    tg.start_soon(self._run_timers)
                    tg.start_soon(self._join)
                    if self.settings.key_file is not None:
                        tg.start_soon(self._watch_key_file, self.settings.key_file)
                    task_status.started(self)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(LEAVE_TIMEOUT_S):
                    await self._leave()

    async def _bind(self) -> tuple[UDPSocket, socket.socket]:
        """UDP first, then TCP on the same port; with port 0, retry when TCP's is taken."""
        host, port = parse_host_port(self.settings.bind)
        for attempt in range(_BIND_ATTEMPTS):
            udp = await anyio.create_udp_socket(local_host=host, local_port=port)
            udp_port = udp.extra(SocketAttribute.local_port)
            try:
                tcp = _tcp_listening_socket(udp.extra(SocketAttribute.raw_socket))
            except OSError as exc:
                await udp.aclose()
                if port != 0 or attempt == _BIND_ATTEMPTS - 1:
                    raise OSError(
                        f"gossip cannot listen on TCP {host}:{udp_port} ({exc}); "
                        "choose another gossip.bind port"
                    ) from exc
                continue
            self.address = self._advertised(host, udp_port)
            self._family = udp.extra(SocketAttribute.family)
            return udp, tcp
        raise AssertionError("unreachable")

    def _advertised(self, bind_host: str, port: int) -> str:
        if not self.settings.advertise:
            return _join_host_port(bind_host, port)
        host, advertised_port = parse_host_port(self.settings.advertise)
        return _join_host_port(host, advertised_port or port)

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
    async def _receive_datagrams(self, udp: UDPSocket) -> None:
        async for data, (host, port) in udp:
            sends = self.node.on_datagram(self._clock(), data, _join_host_port(host, port))
            self._dispatch(sends)

    async def _accept_streams(self, tcp: socket.socket) -> None:
        """Accept TCP connections, each served in a task of its own.

        Waits for readability and accepts without blocking rather than with the event loop's
        `sock_accept`, whose pending accept fails with InvalidStateError when it is cancelled
        just as a connection arrives (asyncio, CPython 3.11).
        """
        assert self._task_group is not None
        while True:
            await anyio.wait_readable(tcp)
            try:
                connection, _ = tcp.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # out of file descriptors, say: try again shortly
                log.warning("gossip cannot accept a TCP connection", error=str(exc))
                await anyio.sleep(0.1)
                continue
            try:
                stream = await SocketStream.from_socket(connection)
            except BaseException:
                connection.close()
                raise
            self._task_group.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: SocketStream) -> None:
        """One inbound TCP message, and the reply if the node has one."""
        async with stream:
            if self._inbound_streams >= MAX_INBOUND_STREAMS:
                self.node.counters.drop("too_many_streams")
                return
            self._inbound_streams += 1
            try:
                source = _join_host_port(*stream.extra(SocketAttribute.remote_address)[:2])
                with anyio.move_on_after(STREAM_TIMEOUT_S):
                    data = await self._read_frame(stream)
                    if data is None:
                        return
                    reply, sends = self.node.on_stream(self._clock(), data, source)
                    self._dispatch(sends)
                    if reply is not None:
                        await stream.send(_frame(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self.node.counters.drop("stream_error")
            finally:
                self._inbound_streams -= 1

    async def _read_frame(
        self, stream: SocketStream, *, may_be_empty: bool = False
    ) -> bytes | None:
        """A 4-byte big-endian length and that many bytes; None (counted) when malformed.

        `may_be_empty`: the peer may close without sending anything (a request with no reply).
        """
        buffered = BufferedByteReceiveStream(stream)
        try:
            head = await buffered.receive_exactly(4)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            if not may_be_empty:
                self.node.counters.drop("truncated")
            return None
        length = int.from_bytes(head, "big")
        if length == 0 or length > _MAX_STREAM_FRAME:
            self.node.counters.drop("too_large" if length else "malformed")
            return None
        try:
            return await buffered.receive_exactly(length)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            self.node.counters.drop("truncated")
        return None

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
            assert self._outbox is not None
            try:
                self._outbox.send_nowait(send)
            except anyio.WouldBlock:
                self.node.counters.drop("send_queue_full")

    async def _send_datagrams(self, outbox: MemoryObjectReceiveStream[Send]) -> None:
        async for send in outbox:
            await self._send_datagram(send)

    async def _send_datagram(self, send: Send) -> None:
        assert self._udp is not None
        try:
            host, port = await self._resolve(send.address)
            await self._udp.sendto(send.data, host, port)
        except (OSError, ValueError, anyio.BrokenResourceError) as exc:
            self.node.counters.drop("send_error")
            log.debug("gossip send failed", address=send.address, error=str(exc))

    async def _exchange(self, send: Send) -> bool:
        """Send one TCP message; feed the reply, if any, back to the node. True if one came."""
        reply: bytes | None = None
        try:
            with anyio.fail_after(STREAM_TIMEOUT_S):
                host, port = await self._resolve(send.address)
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(_frame(send.data))
                    await stream.send_eof()
                    reply = await self._read_frame(stream, may_be_empty=True)
        except (OSError, TimeoutError, ValueError, anyio.BrokenResourceError) as exc:
            log.debug("gossip stream failed", address=send.address, error=str(exc))
            return False
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
            addresses = await self._resolve_seeds()
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

    async def _resolve_seeds(self) -> list[str]:
        addresses: list[str] = []
        for seed in self.settings.seeds:
            host, port = parse_host_port(seed)
            try:
                infos = await anyio.getaddrinfo(
                    host, port, family=self._family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                log.warning("gossip seed does not resolve", seed=seed, error=str(exc))
                continue
            for info in infos:  # a name with several addresses: every one is a seed
                address = _join_host_port(str(info[4][0]), port)
                if address not in addresses:
                    addresses.append(address)
        return addresses

    async def _resolve(self, address: str) -> tuple[str, int]:
        """`host:port` -> (IP, port), caching DNS answers for a minute (never blocks the loop)."""
        host, port = parse_host_port(address)
        if _is_ip(host):
            return host, port
        cached = self._resolved.get(host)
        now = time.monotonic()
        if cached is not None and now - cached[1] < 60.0:
            return cached[0], port
        infos = await anyio.getaddrinfo(host, port, family=self._family, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"{host!r} does not resolve")
        ip = str(infos[0][4][0])
        self._resolved[host] = (ip, now)
        return ip, port

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
        if self._node is None or self._udp is None:
            return
        for send in self.node.leave(self._clock()):
            if not send.stream:
                await self._send_datagram(send)
        self._emit_events()
        for _ in range(3):
            await anyio.sleep(max(0.0, self.node.next_deadline_s - self._clock()))
            for send in self.node.tick(self._clock()):
                if not send.stream:
                    await self._send_datagram(send)
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


def _tcp_listening_socket(udp: socket.socket) -> socket.socket:
    """A non-blocking TCP socket listening on the UDP socket's address (same family, port)."""
    tcp = socket.socket(udp.family, socket.SOCK_STREAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(udp.getsockname())
        tcp.listen(128)
        tcp.setblocking(False)
    except BaseException:
        tcp.close()
        raise
    return tcp


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

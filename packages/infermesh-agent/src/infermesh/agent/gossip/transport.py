"""UDP and TCP on one gossip port: binding, length-prefixed TCP messages, a datagram writer, DNS.

It only moves bytes between sockets and the caller's handlers; it never decodes a packet nor
decides what to send (the node does), and counts what it drops through the caller's `drop`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import SocketAttribute, SocketStream, UDPSocket
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from infermesh.agent.gossip.codec import MAX_STREAM_BYTES
from infermesh.agent.gossip.keyring import SEAL_OVERHEAD
from infermesh.core.config import parse_host_port
from infermesh.core.logging import get_logger

__all__ = ["Transport", "join_host_port"]

log = get_logger("infermesh.agent.gossip")

STREAM_TIMEOUT_S = 5.0  # one TCP exchange (connect, request, reply) must finish by then
MAX_INBOUND_STREAMS = 64  # TCP connections served at once; more are closed at once (counted)
OUTBOX_DATAGRAMS = 4096  # datagrams queued for sending; more are dropped (counted)
_MAX_STREAM_FRAME = MAX_STREAM_BYTES + SEAL_OVERHEAD
_BIND_ATTEMPTS = 8
_DNS_CACHE_S = 60.0

DatagramHandler = Callable[[bytes, str], None]  # (data, source host:port)
StreamHandler = Callable[[bytes, str], bytes | None]  # (request, source) -> reply


class Transport:
    """A bound UDP socket and a listening TCP socket on the same port, until `aclose()`.

    `drop(reason)` is called for every datagram or TCP message lost here (reasons: truncated,
    too_large, malformed, too_many_streams, stream_error, send_error, send_queue_full).
    """

    def __init__(
        self, udp: UDPSocket, tcp: socket.socket, host: str, drop: Callable[[str], None]
    ) -> None:
        self.host = host  # the bind host, as configured
        self.port: int = udp.extra(SocketAttribute.local_port)
        self.family: socket.AddressFamily = udp.extra(SocketAttribute.family)  # peers must match
        self._udp = udp
        self._tcp = tcp
        self._drop = drop
        self._resolved: dict[str, tuple[str, float]] = {}
        self._inbound_streams = 0
        # Datagrams wait here for the one task that writes to the UDP socket.
        self._outbox: MemoryObjectSendStream[tuple[str, bytes]]
        self._outbox_reader: MemoryObjectReceiveStream[tuple[str, bytes]]
        self._outbox, self._outbox_reader = anyio.create_memory_object_stream[tuple[str, bytes]](
            OUTBOX_DATAGRAMS
        )

    @classmethod
    async def bind(cls, bind: str, drop: Callable[[str], None]) -> Transport:
        """UDP first, then TCP on the same port; with port 0, retry when TCP's is taken."""
        host, port = parse_host_port(bind)
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
            return cls(udp, tcp, host, drop)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        """Close the UDP socket, the datagram queue and the TCP listener."""
        try:
            await self._udp.aclose()
        finally:
            self._outbox_reader.close()
            self._outbox.close()
            self._tcp.close()

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ inbound
    async def receive_datagrams(self, handle: DatagramHandler) -> None:
        """Call `handle(data, source)` for every datagram, until cancelled."""
        async for data, (host, port) in self._udp:
            handle(data, join_host_port(host, port))

    async def serve_streams(self, handle: StreamHandler) -> None:
        """Accept TCP connections until cancelled, each served in a task of its own: one framed
        request in, `handle(request, source)`, and its reply framed back if there is one.

        Waits for readability and accepts without blocking rather than with the event loop's
        `sock_accept`, whose pending accept fails with InvalidStateError when it is cancelled
        just as a connection arrives (asyncio, CPython 3.11).
        """
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(self._tcp)
                try:
                    connection, _ = self._tcp.accept()
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
                tg.start_soon(self._serve_stream, stream, handle)

    async def _serve_stream(self, stream: SocketStream, handle: StreamHandler) -> None:
        async with stream:
            if self._inbound_streams >= MAX_INBOUND_STREAMS:
                self._drop("too_many_streams")
                return
            self._inbound_streams += 1
            try:
                source = join_host_port(*stream.extra(SocketAttribute.remote_address)[:2])
                with anyio.move_on_after(STREAM_TIMEOUT_S):
                    data = await self._read_frame(stream)
                    if data is None:
                        return
                    reply = handle(data, source)
                    if reply is not None:
                        await stream.send(_frame(reply))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                self._drop("stream_error")
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
                self._drop("truncated")
            return None
        length = int.from_bytes(head, "big")
        if length == 0 or length > _MAX_STREAM_FRAME:
            self._drop("too_large" if length else "malformed")
            return None
        try:
            return await buffered.receive_exactly(length)
        except (anyio.IncompleteRead, anyio.EndOfStream):
            self._drop("truncated")
        return None

    # ----------------------------------------------------------------- outbound
    def queue_datagram(self, address: str, data: bytes) -> None:
        """Queue a datagram for `write_datagrams`; dropped (counted) when the queue is full."""
        try:
            self._outbox.send_nowait((address, data))
        except anyio.WouldBlock:
            self._drop("send_queue_full")

    async def write_datagrams(self) -> None:
        """The one task that sends queued datagrams, until cancelled."""
        async for address, data in self._outbox_reader:
            await self.send_datagram(address, data)

    async def send_datagram(self, address: str, data: bytes) -> None:
        """Send one datagram now; a failure is counted and logged, never raised."""
        try:
            host, port = await self._resolve(address)
            await self._udp.sendto(data, host, port)
        except (OSError, ValueError, anyio.BrokenResourceError) as exc:
            self._drop("send_error")
            log.debug("gossip send failed", address=address, error=str(exc))

    async def exchange(self, address: str, data: bytes) -> bytes | None:
        """Send one TCP message and return the peer's reply; None when there is none or it
        failed (logged), all within STREAM_TIMEOUT_S."""
        try:
            with anyio.fail_after(STREAM_TIMEOUT_S):
                host, port = await self._resolve(address)
                async with await anyio.connect_tcp(host, port) as stream:
                    await stream.send(_frame(data))
                    await stream.send_eof()
                    return await self._read_frame(stream, may_be_empty=True)
        except (OSError, TimeoutError, ValueError, anyio.BrokenResourceError) as exc:
            log.debug("gossip stream failed", address=address, error=str(exc))
            return None

    # ---------------------------------------------------------------------- DNS
    async def resolve_seeds(self, seeds: Sequence[str]) -> list[str]:
        """Every address each seed resolves to now (names resolved afresh on every call)."""
        addresses: list[str] = []
        for seed in seeds:
            host, port = parse_host_port(seed)
            try:
                infos = await anyio.getaddrinfo(
                    host, port, family=self.family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                log.warning("gossip seed does not resolve", seed=seed, error=str(exc))
                continue
            for info in infos:  # a name with several addresses: every one is a seed
                address = join_host_port(str(info[4][0]), port)
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
        if cached is not None and now - cached[1] < _DNS_CACHE_S:
            return cached[0], port
        infos = await anyio.getaddrinfo(host, port, family=self.family, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"{host!r} does not resolve")
        ip = str(infos[0][4][0])
        self._resolved[host] = (ip, now)
        return ip, port


def join_host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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

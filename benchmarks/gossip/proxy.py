"""A lossy UDP + TCP forwarding proxy: inbound packet loss for one gossip member, no tc needed.

The member binds its real port and advertises the proxy's address, so every packet the other
members send it goes through the proxy. The proxy drops a fraction `loss` of the inbound UDP
datagrams and forwards the rest; TCP connections (push-pull, memberlist's TCP fallback ping)
are forwarded intact. It is the same fault for Serf and InferMesh: neither needs to cooperate.

UDP works like a small NAT: each remote sender gets its own upstream socket, so the member sees
one distinct source per sender, and whatever the member sends back to that source is relayed to
the sender from the proxy's listening address (never dropped: only inbound loss is injected).

Run it as a child process and steer it through stdin, one command per line:

    python -m benchmarks.gossip.proxy --listen 127.0.0.1:A --target 127.0.0.1:B [--loss 0.1]
    loss 0.1      -> set the drop fraction (0..1)
    stats         -> print one JSON line of counters
    (EOF)         -> print the counters and exit

It prints `{"ready": true, ...}` once both listeners are bound. Loopback only by intent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import typing
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass

__all__ = ["LossyProxy", "ProxyStats", "main", "parse_address"]

MAX_UDP_PEERS = 1024
"""Upstream sockets kept at once; the least recently used one is closed beyond this."""
MAX_DATAGRAM = 65535
COPY_CHUNK = 64 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """`host:port` -> (host, port); ValueError with the expected form otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:7946), got {text!r}")
    return host, int(port_text)


@dataclass
class ProxyStats:
    """What went through the proxy since it started."""

    udp_in: int = 0
    """Datagrams received from remote senders (dropped ones included)."""
    udp_dropped: int = 0
    """Inbound datagrams dropped on purpose."""
    udp_forwarded: int = 0
    """Inbound datagrams passed on to the member."""
    udp_replies: int = 0
    """Datagrams the member sent back to a sender's upstream socket, relayed to that sender."""
    tcp_connections: int = 0
    tcp_bytes_in: int = 0
    """Bytes forwarded from remote connections to the member."""
    tcp_bytes_out: int = 0
    """Bytes forwarded from the member back to remote connections."""
    loss: float = 0.0
    """The drop fraction in force now."""


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, proxy: LossyProxy) -> None:
        self._proxy = proxy

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._proxy._inbound(data, addr)


class _Upstream(asyncio.DatagramProtocol):
    """One remote sender's socket towards the member; relays the member's answers back."""

    def __init__(self, proxy: LossyProxy, peer: tuple[str, int]) -> None:
        self._proxy = proxy
        self._peer = peer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._proxy._reply(data, self._peer)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable while the member restarts: UDP is lossy anyway


class LossyProxy:
    """Listens on `listen` (UDP and TCP), forwards to `target`, drops inbound UDP at `loss`."""

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        loss: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.listen = listen
        self.target = target
        self.stats = ProxyStats()
        self.set_loss(loss)
        self._rng = rng if rng is not None else random.Random()
        self._listener: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._upstreams: OrderedDict[tuple[str, int], _Upstream] = OrderedDict()
        self._pending: dict[tuple[str, int], list[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """Where the proxy listens (the port resolved when `listen` asked for port 0)."""
        return self.listen

    def set_loss(self, loss: float) -> None:
        if not 0.0 <= loss <= 1.0:
            raise ValueError(f"loss must be within 0..1, got {loss!r}")
        self.stats.loss = loss

    async def start(self) -> None:
        """Bind the UDP and TCP listeners on the same port."""
        loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._on_connection, *self.listen)
        port = self._server.sockets[0].getsockname()[1]
        self.listen = (self.listen[0], port)
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=self.listen
        )
        self._listener = transport

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._listener is not None:
            self._listener.close()
        for upstream in self._upstreams.values():
            if upstream.transport is not None:
                upstream.transport.close()
        self._upstreams.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    # ----------------------------------------------------------------- UDP

    def _inbound(self, data: bytes, peer: tuple[str, int]) -> None:
        self.stats.udp_in += 1
        if self.stats.loss > 0.0 and self._rng.random() < self.stats.loss:
            self.stats.udp_dropped += 1
            return
        self.stats.udp_forwarded += 1
        upstream = self._upstreams.get(peer)
        if upstream is not None and upstream.transport is not None:
            self._upstreams.move_to_end(peer)
            upstream.transport.sendto(data)
            return
        pending = self._pending.get(peer)
        if pending is not None:  # its upstream socket is being opened
            pending.append(data)
            return
        self._pending[peer] = [data]
        self._spawn(self._open_upstream(peer))

    async def _open_upstream(self, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _Upstream(self, peer),
                local_addr=(self.target[0], 0),
                remote_addr=self.target,
            )
        except OSError:
            self._pending.pop(peer, None)
            return
        assert isinstance(protocol, _Upstream)
        self._upstreams[peer] = protocol
        for data in self._pending.pop(peer, []):
            transport.sendto(data)
        while len(self._upstreams) > MAX_UDP_PEERS:
            _, oldest = self._upstreams.popitem(last=False)
            if oldest.transport is not None:
                oldest.transport.close()

    def _reply(self, data: bytes, peer: tuple[str, int]) -> None:
        if self._listener is not None:
            self.stats.udp_replies += 1
            self._listener.sendto(data, peer)

    # ----------------------------------------------------------------- TCP

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.stats.tcp_connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        inbound = self._spawn(self._copy(reader, up_writer, inbound=True))
        outbound = self._spawn(self._copy(up_reader, writer, inbound=False))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(inbound, outbound, return_exceptions=True)

    async def _copy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, inbound: bool
    ) -> None:
        try:
            while chunk := await reader.read(COPY_CHUNK):
                if inbound:
                    self.stats.tcp_bytes_in += len(chunk)
                else:
                    self.stats.tcp_bytes_out += len(chunk)
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass
        finally:
            if not inbound:
                writer.close()

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


# --------------------------------------------------------------------- command line


def _stats_line(proxy: LossyProxy) -> str:
    return json.dumps(asdict(proxy.stats), separators=(",", ":"))


async def _serve(args: argparse.Namespace) -> None:
    proxy = LossyProxy(
        parse_address(args.listen),
        parse_address(args.target),
        loss=args.loss,
        rng=random.Random(args.seed),
    )
    await proxy.start()
    host, port = proxy.address
    print(json.dumps({"ready": True, "listen": f"{host}:{port}"}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command, _, value = line.decode(errors="replace").strip().partition(" ")
            if command == "loss":
                try:
                    proxy.set_loss(float(value))
                except ValueError as exc:
                    print(json.dumps({"error": str(exc)}), flush=True)
                    continue
                print(_stats_line(proxy), flush=True)
            elif command == "stats":
                print(_stats_line(proxy), flush=True)
            elif command:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    finally:
        print(_stats_line(proxy), flush=True)
        await proxy.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--listen", required=True, help="HOST:PORT the proxy listens on")
    parser.add_argument("--target", required=True, help="HOST:PORT of the member's real bind")
    parser.add_argument("--loss", type=float, default=0.0, help="inbound UDP drop fraction")
    parser.add_argument("--seed", type=int, default=None, help="seed of the drop decisions")
    args = parser.parse_args(argv)
    try:
        parse_address(args.listen)
        parse_address(args.target)
        if not 0.0 <= args.loss <= 1.0:
            raise ValueError(f"--loss must be within 0..1, got {args.loss}")
    except ValueError as exc:
        parser.error(str(exc))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

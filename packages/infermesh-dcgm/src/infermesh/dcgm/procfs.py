"""Parsers for the Linux /proc text replica discovery reads (sans-I/O: text in, values out).

`/proc/net/tcp` and `/proc/net/tcp6` give the listening sockets (local address, port, inode),
`/proc/<pid>/fd/*` links (`socket:[inode]`) which process holds which socket, and
`/proc/<pid>/stat` each process's parent. A line that cannot be parsed is skipped with the
reason; nothing here raises for malformed socket tables.
"""

from __future__ import annotations

import ipaddress
import string
import sys

import attrs

__all__ = [
    "ListeningSocket",
    "SocketTable",
    "parent_pid",
    "parse_socket_table",
    "socket_inode",
]

TCP_LISTEN = 0x0A
"""The `st` column of a socket in the LISTEN state (include/net/tcp_states.h)."""

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class ListeningSocket:
    """One TCP socket in the LISTEN state."""

    address: IpAddress
    port: int
    inode: int


@attrs.frozen
class SocketTable:
    """The listening sockets of one or more /proc/net/tcp* texts, and the lines skipped."""

    listening: tuple[ListeningSocket, ...] = ()
    skipped: tuple[str, ...] = ()
    """`<source> line N: <why>` for every line that could not be parsed."""

    def __add__(self, other: SocketTable) -> SocketTable:
        return SocketTable(self.listening + other.listening, self.skipped + other.skipped)


def _address(text: str, byteorder: str) -> IpAddress:
    """A /proc/net/tcp* address: 8 (IPv4) or 32 (IPv6) hex digits, in 32-bit words written in
    the host's byte order."""
    if len(text) not in (8, 32) or not all(c in string.hexdigits for c in text):
        raise ValueError(f"local address {text!r} is not 8 or 32 hex digits")
    raw = bytes.fromhex(text)
    if byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    return ipaddress.IPv6Address(raw)


def parse_socket_table(
    text: str, source: str = "/proc/net/tcp", *, byteorder: str = sys.byteorder
) -> SocketTable:
    """The LISTEN rows of a `/proc/net/tcp` or `/proc/net/tcp6` text.

    Rows in other states are left out; the header, blank lines and a row with inode 0 are
    ignored; any other line that is not a socket row is skipped with its reason.
    """
    listening: list[ListeningSocket] = []
    skipped: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "sl":
            continue
        try:
            if len(fields) < 10 or not fields[0].endswith(":"):
                raise ValueError(f"expected a socket row of at least 10 fields, got {line!r}")
            local, _, port_text = fields[1].partition(":")
            if fields[3] != f"{TCP_LISTEN:02X}":
                continue
            address = _address(local, byteorder)
            if not port_text or not all(c in string.hexdigits for c in port_text):
                raise ValueError(f"local port {port_text!r} is not hex")
            if not fields[9].isdigit():
                raise ValueError(f"inode {fields[9]!r} is not a number")
            port, inode = int(port_text, 16), int(fields[9])
        except ValueError as exc:
            skipped.append(f"{source} line {number}: {exc}")
            continue
        if inode:
            listening.append(ListeningSocket(address, port, inode))
    return SocketTable(tuple(listening), tuple(skipped))


def socket_inode(link: str) -> int | None:
    """The inode of a `/proc/<pid>/fd/N` link target `socket:[12345]`; None for other files."""
    if not (link.startswith("socket:[") and link.endswith("]")):
        return None
    digits = link[len("socket:[") : -1]
    return int(digits) if digits.isdigit() else None


def parent_pid(stat: str) -> int:
    """The parent pid from a `/proc/<pid>/stat` text: `pid (comm) state ppid ...`.

    The command name may hold spaces and parentheses, so the fields after it are found from
    the last `)`. Raises ValueError saying what is wrong with a text of another shape.
    """
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 2 or not fields[1].isdigit():
        raise ValueError(f"not a /proc/<pid>/stat line: {stat[:80]!r}")
    return int(fields[1])

"""Reads Linux's /proc for replica discovery (blocking file reads: run it in a worker thread).

The thin I/O shell around `procfs` (parsers) and `replica_gpus` (the resolver): the listening
sockets of the agent's network namespace, every process's parent, and which processes hold
the sockets of the runtimes' ports. Processes that exit while being read are skipped; another
user's processes, whose open files the agent may not read, are counted. Elsewhere than Linux,
every runtime gets the reason that discovery is unavailable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from infermesh.core.scoring.gpu_map import ReplicaGpus
from infermesh.dcgm.procfs import SocketTable, parent_pid, parse_socket_table, socket_inode
from infermesh.dcgm.replica_gpus import (
    GpuProcess,
    ProcessTable,
    listening_on,
    resolve_replicas,
    runtime_endpoint,
)

__all__ = ["Discovery", "discover_replica_gpus", "read_process_table", "read_socket_table"]

PROC = Path("/proc")


@attrs.frozen
class Discovery:
    """The answer per runtime URL, and the /proc/net lines that could not be parsed."""

    replicas: dict[str, ReplicaGpus]
    skipped: tuple[str, ...] = ()


class ProcUnavailableError(RuntimeError):
    """This machine has no /proc socket table to read; says why."""


def read_socket_table(proc: Path = PROC) -> SocketTable:
    """The listening TCP sockets of `proc/net/tcp` and `proc/net/tcp6` (absent without IPv6)."""
    table = SocketTable()
    for name in ("tcp", "tcp6"):
        path = proc / "net" / name
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            if name == "tcp":
                raise ProcUnavailableError(f"{path} does not exist") from None
            continue
        except OSError as exc:
            raise ProcUnavailableError(f"cannot read {path}: {exc}") from None
        table += parse_socket_table(text, str(path))
    return table


def _held_sockets(fd_dir: Path, inodes: frozenset[int]) -> frozenset[int]:
    held = set()
    for fd in os.listdir(fd_dir):
        try:
            inode = socket_inode(os.readlink(fd_dir / fd))
        except OSError:  # closed meanwhile
            continue
        if inode in inodes:
            held.add(inode)
    return frozenset(held)


def read_process_table(inodes: frozenset[int], proc: Path = PROC) -> ProcessTable:
    """Every process's parent, and which processes hold the sockets `inodes` (nothing is read
    when `inodes` is empty: no runtime's port listens, so no process can be its server)."""
    parents: dict[int, int] = {}
    sockets: dict[int, frozenset[int]] = {}
    unreadable = 0
    if not inodes:
        return ProcessTable(parents=parents, sockets=sockets)
    with os.scandir(proc) as entries:
        pids = [int(entry.name) for entry in entries if entry.name.isdigit()]
    for pid in pids:
        try:
            parents[pid] = parent_pid((proc / str(pid) / "stat").read_text(errors="replace"))
            held = _held_sockets(proc / str(pid) / "fd", inodes)
        except PermissionError:  # another user's process: its open files are not ours to read
            unreadable += 1
            continue
        except (OSError, ValueError):  # exited meanwhile
            continue
        if held:
            sockets[pid] = held
    return ProcessTable(parents=parents, sockets=sockets, unreadable=unreadable)


def _wanted_inodes(urls: Sequence[str], table: SocketTable) -> frozenset[int]:
    inodes: set[int] = set()
    for url in urls:
        try:
            host, port = runtime_endpoint(url)
        except ValueError:
            continue  # the resolver says why
        inodes.update(s.inode for s in listening_on(table, host, port))
    return frozenset(inodes)


def discover_replica_gpus(
    urls: Sequence[str],
    gpu_processes: Sequence[GpuProcess],
    unlisted: Mapping[str, str] | None = None,
    *,
    proc: Path = PROC,
) -> Discovery:
    """For each runtime URL, the GPUs NVML lists its processes on (see `replica_gpus`)."""
    if sys.platform != "linux":
        why = f"replica discovery reads Linux's /proc; this is {sys.platform}"
        return Discovery({url: ReplicaGpus(reason=why) for url in urls})
    try:
        table = read_socket_table(proc)
    except ProcUnavailableError as exc:
        why = f"replica discovery cannot read the socket table: {exc}"
        return Discovery({url: ReplicaGpus(reason=why) for url in urls})
    processes = read_process_table(_wanted_inodes(urls, table), proc)
    replicas = resolve_replicas(urls, table, processes, gpu_processes, unlisted)
    return Discovery(replicas, table.skipped)

"""Which GPUs a local runtime runs on, from its port, the process tree and NVML (sans-I/O).

A runtime is found by the port of its URL: the processes holding a socket that listens on it
are the server; the server and all its descendants are the replica (vLLM's EngineCore and its
tensor-parallel workers are children of the API server, and they hold the GPU contexts); the
GPUs NVML lists any of those processes on are the replica's GPUs. Pure functions over parsed
/proc and NVML data; `proc_reader` and the NVML adapter do the reading.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlsplit

import attrs

from infermesh.core.scoring.gpu_map import ReplicaGpus
from infermesh.dcgm.procfs import IpAddress, ListeningSocket, SocketTable

__all__ = [
    "GpuProcess",
    "ProcessTable",
    "descendants",
    "listening_on",
    "resolve_replicas",
    "runtime_endpoint",
]

INIT_PID = 1
"""Never a replica's root: PID 1 holds listening sockets it passes to services it starts
(systemd socket activation), and every process descends from it."""

_CONTAINER_HINT = "set [[runtimes]] gpus for it"


@attrs.frozen
class ProcessTable:
    """This machine's processes as /proc shows them to the agent."""

    parents: Mapping[int, int]
    """pid -> parent pid, for every process seen."""
    sockets: Mapping[int, frozenset[int]]
    """pid -> inodes of the sockets it holds (only the sockets asked about)."""
    unreadable: int = 0
    """Processes whose open files the agent may not read (another user's, without root)."""


@attrs.frozen
class GpuProcess:
    """A process NVML lists on a GPU: `gpu` is the GpuKey `gpu_uuid` (a MIG instance as
    `<GPU UUID>/gi<id>`)."""

    pid: int
    gpu: str


def runtime_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of a runtime URL; the scheme's port when none is written.

    Raises ValueError saying what is wrong with the URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL with a host")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _serves(address: IpAddress, host: str) -> bool:
    """Whether a socket bound to `address` accepts connections a client makes to `host`."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified:
        return True
    try:
        wanted = ipaddress.ip_address(host)
    except ValueError:  # a host name: only "localhost" says which addresses it means
        return address.is_loopback if host == "localhost" else True
    return address == wanted


def listening_on(table: SocketTable, host: str, port: int) -> tuple[ListeningSocket, ...]:
    """The listening sockets that serve `host:port`."""
    return tuple(s for s in table.listening if s.port == port and _serves(s.address, host))


def descendants(roots: Iterable[int], parents: Mapping[int, int]) -> frozenset[int]:
    """`roots` and every process below them."""
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return frozenset(found)


def _holders(sockets: Sequence[ListeningSocket], processes: ProcessTable) -> tuple[int, ...]:
    inodes = {s.inode for s in sockets}
    return tuple(sorted(pid for pid, held in processes.sockets.items() if held & inodes))


def _gpus_of(tree: frozenset[int], gpu_processes: Sequence[GpuProcess]) -> tuple[str, ...]:
    gpus = {p.gpu for p in gpu_processes if p.pid in tree}
    # A MIG-enabled GPU runs processes only inside its instances: name the instances.
    parents_of_instances = {gpu.partition("/")[0] for gpu in gpus if "/" in gpu}
    return tuple(sorted(gpus - parents_of_instances))


def _resolve(
    url: str,
    sockets: SocketTable,
    processes: ProcessTable,
    gpu_processes: Sequence[GpuProcess],
    unlisted: Mapping[str, str],
) -> ReplicaGpus:
    try:
        host, port = runtime_endpoint(url)
    except ValueError as exc:
        return ReplicaGpus(reason=f"cannot tell the runtime's port: {exc}")
    listeners = listening_on(sockets, host, port)
    if not listeners:
        return ReplicaGpus(
            reason=f"nothing on this machine listens on {host}:{port} (a runtime on another "
            f"machine or in another network namespace, e.g. a container: {_CONTAINER_HINT})"
        )
    holders = _holders(listeners, processes)
    roots = tuple(pid for pid in holders if pid != INIT_PID)
    if not roots:
        why = (
            "only PID 1 holds it (socket activation?)"
            if holders
            else f"no process the agent may read holds it ({processes.unreadable} processes' "
            "open files are not readable: run the agent as the runtime's user or as root)"
        )
        return ReplicaGpus(reason=f"port {port} listens but {why}; {_CONTAINER_HINT}")
    gpus = _gpus_of(descendants(roots, processes.parents), gpu_processes)
    if gpus:
        return ReplicaGpus(gpus=gpus, pids=roots)
    notes = []
    hidden = sorted({p.pid for p in gpu_processes if p.pid not in processes.parents})
    if hidden:
        notes.append(
            f"NVML lists processes this /proc does not show (pids {', '.join(map(str, hidden))}): "
            "the agent runs in another PID namespace than the runtime (a container?)"
        )
    if unlisted:
        notes.append(
            "NVML cannot list the processes of "
            + ", ".join(f"{gpu} ({why})" for gpu, why in sorted(unlisted.items()))
        )
    served = "pid " + ", ".join(map(str, roots))
    note = f"; {'; '.join(notes)}" if notes else ""
    return ReplicaGpus(
        pids=roots,
        reason=f"the processes of port {port} ({served} and its children) are on no GPU NVML "
        f"lists{note}; {_CONTAINER_HINT} if it uses one",
    )


def resolve_replicas(
    urls: Iterable[str],
    sockets: SocketTable,
    processes: ProcessTable,
    gpu_processes: Sequence[GpuProcess],
    unlisted: Mapping[str, str] | None = None,
) -> dict[str, ReplicaGpus]:
    """For each runtime URL, the GPUs its processes run on, or why none were found.

    `unlisted` names the GPUs whose processes NVML could not list, with the reason (e.g. `not
    supported on this GPU`): they are named when a runtime maps to no GPU.
    """
    return {url: _resolve(url, sockets, processes, gpu_processes, unlisted or {}) for url in urls}

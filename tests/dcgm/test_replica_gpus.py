"""Which GPUs a replica runs on, from recorded /proc text and NVML's process lists (sans-I/O):
the socket-table, fd-link and stat parsers, and the resolver from a runtime URL to GPUs."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import pytest

from infermesh.core.scoring.gpu_map import ReplicaGpus
from infermesh.dcgm.proc_reader import discover_replica_gpus
from infermesh.dcgm.procfs import SocketTable, parent_pid, parse_socket_table, socket_inode
from infermesh.dcgm.replica_gpus import (
    GpuProcess,
    ProcessTable,
    descendants,
    resolve_replicas,
    runtime_endpoint,
)

DATA = Path(__file__).parent / "data" / "proc"
A100 = "GPU-3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"


def recorded_table() -> SocketTable:
    return parse_socket_table((DATA / "tcp").read_text(), "tcp", byteorder="little") + (
        parse_socket_table((DATA / "tcp6").read_text(), "tcp6", byteorder="little")
    )


# --------------------------------------------------------------------------- parsers


def test_listening_rows_of_tcp_and_tcp6_with_their_address_port_and_inode() -> None:
    table = recorded_table()
    got = {(str(s.address), s.port, s.inode) for s in table.listening}
    assert got == {
        ("0.0.0.0", 8000, 40001),
        ("127.0.0.1", 8001, 40002),
        ("::", 8004, 40004),
        ("::ffff:7f00:1", 8005, 40005),
        ("::1", 8006, 40006),
    }
    mapped = next(s.address for s in table.listening if s.port == 8005)
    assert isinstance(mapped, ipaddress.IPv6Address)
    assert mapped.ipv4_mapped == ipaddress.IPv4Address("127.0.0.1")


def test_garbage_lines_are_skipped_with_the_reason_and_never_raise() -> None:
    skipped = recorded_table().skipped
    assert len(skipped) == 3
    assert skipped[0] == "tcp line 6: local address 'ZZZZZZZZ' is not 8 or 32 hex digits"
    assert skipped[1] == (
        "tcp line 7: expected a socket row of at least 10 fields, "
        "got 'garbage: this is not a socket row'"
    )
    assert skipped[2].startswith("tcp6 line 6: expected a socket row")
    binary = parse_socket_table("\x00\xff binary\n\n   \n")
    assert binary.listening == ()
    assert binary.skipped[0].startswith("/proc/net/tcp line 1: expected a socket row")
    assert len(binary.skipped) == 1  # blank lines are not garbage


def test_a_big_endian_table_reads_the_same_addresses() -> None:
    row = "   0: 7F000001:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 7 1"
    (listening,) = parse_socket_table(row, byteorder="big").listening
    assert (str(listening.address), listening.port, listening.inode) == ("127.0.0.1", 8000, 7)


def test_fd_links_name_socket_inodes_and_nothing_else() -> None:
    assert socket_inode("socket:[40001]") == 40001
    assert socket_inode("/dev/nvidia0") is None
    assert socket_inode("pipe:[123]") is None
    assert socket_inode("socket:[x]") is None


def test_the_parent_pid_survives_spaces_and_parentheses_in_the_command_name() -> None:
    assert parent_pid("4242 (VLLM::Worker (TP1)) S 4100 4242 4000 0 -1 4194560 1 0") == 4100
    assert parent_pid("1 (systemd) S 0 1 1 0 -1 4194560") == 0
    with pytest.raises(ValueError, match="not a /proc/<pid>/stat line"):
        parent_pid("garbage")


def test_runtime_endpoints_take_the_scheme_port_when_none_is_written() -> None:
    assert runtime_endpoint("http://127.0.0.1:8000/v1") == ("127.0.0.1", 8000)
    assert runtime_endpoint("https://vllm.local") == ("vllm.local", 443)
    assert runtime_endpoint("http://[::1]:8006") == ("::1", 8006)
    with pytest.raises(ValueError, match="not an http:// or https:// URL"):
        runtime_endpoint("unix:///run/vllm.sock")
    with pytest.raises(ValueError, match="Port out of range"):
        runtime_endpoint("http://127.0.0.1:99999")


# --------------------------------------------------------------------------- the resolver

# A vLLM server (pid 100, holding the socket of port 8000) with its EngineCore (101) and two
# tensor-parallel workers (102, 103); another server on port 8001 (300) whose worker (301) runs
# on a MIG instance; an unrelated process on GPU-C; pid 1 above them all.
PARENTS = {1: 0, 100: 1, 101: 100, 102: 101, 103: 101, 200: 1, 300: 1, 301: 300}
SOCKETS = {100: frozenset({40001}), 300: frozenset({40002})}
ON_GPUS = (
    GpuProcess(102, "GPU-A"),
    GpuProcess(103, "GPU-B"),
    GpuProcess(200, "GPU-C"),
    GpuProcess(301, f"{A100}/gi1"),
)


def resolve(
    url: str,
    processes: ProcessTable | None = None,
    gpu_processes: tuple[GpuProcess, ...] = ON_GPUS,
    unlisted: dict[str, str] | None = None,
) -> ReplicaGpus:
    processes = processes or ProcessTable(parents=PARENTS, sockets=SOCKETS)
    return resolve_replicas([url], recorded_table(), processes, gpu_processes, unlisted)[url]


def test_a_server_with_two_tensor_parallel_workers_maps_to_both_gpus() -> None:
    found = resolve("http://127.0.0.1:8000")
    assert found == ReplicaGpus(gpus=("GPU-A", "GPU-B"), pids=(100,))
    assert descendants([100], PARENTS) == {100, 101, 102, 103}


def test_a_worker_on_a_mig_instance_maps_to_the_instance() -> None:
    assert resolve("http://127.0.0.1:8001/v1").gpus == (f"{A100}/gi1",)
    # NVML's aggregate answer on the GPU's handle and the instance's own answer: the instance.
    both = (*ON_GPUS, GpuProcess(301, A100))
    assert resolve("http://127.0.0.1:8001", gpu_processes=both).gpus == (f"{A100}/gi1",)


def test_the_listening_address_must_serve_the_urls_host() -> None:
    # 8001 listens on 127.0.0.1 only: a URL naming another address is another machine's port.
    assert (
        "nothing on this machine listens on 10.1.2.3:8001" in resolve("http://10.1.2.3:8001").reason
    )
    # 8000 listens on every address; IPv4-mapped and ::1 listeners serve their hosts.
    assert resolve("http://10.1.2.3:8000").gpus == ("GPU-A", "GPU-B")
    processes = ProcessTable(parents=PARENTS, sockets={100: frozenset({40005, 40006})})
    assert resolve("http://127.0.0.1:8005", processes).gpus == ("GPU-A", "GPU-B")
    assert resolve("http://localhost:8006", processes).gpus == ("GPU-A", "GPU-B")


def test_a_port_nothing_listens_on_says_to_configure_the_gpus() -> None:
    found = resolve("http://127.0.0.1:9999")
    assert found.gpus == ()
    assert found.reason == (
        "nothing on this machine listens on 127.0.0.1:9999 (a runtime on another machine or in "
        "another network namespace, e.g. a container: set [[runtimes]] gpus for it)"
    )
    assert "cannot tell the runtime's port" in resolve("ftp://x").reason


def test_a_socket_whose_holder_cannot_be_read_names_the_permission_problem() -> None:
    hidden = ProcessTable(parents=PARENTS, sockets={}, unreadable=7)
    assert resolve("http://127.0.0.1:8000", hidden).reason == (
        "port 8000 listens but no process the agent may read holds it (7 processes' open files "
        "are not readable: run the agent as the runtime's user or as root); set [[runtimes]] "
        "gpus for it"
    )
    activated = ProcessTable(parents=PARENTS, sockets={1: frozenset({40001})})
    assert (
        "only PID 1 holds it (socket activation?)"
        in resolve("http://127.0.0.1:8000", activated).reason
    )


def test_nvml_not_supported_leaves_the_replica_unmapped_with_the_reason() -> None:
    found = resolve(
        "http://127.0.0.1:8000",
        gpu_processes=(),
        unlisted={
            "GPU-A": "compute: not supported on this GPU; graphics: not supported on this GPU"
        },
    )
    assert found.gpus == ()
    assert found.pids == (100,)
    assert found.reason == (
        "the processes of port 8000 (pid 100 and its children) are on no GPU NVML lists; NVML "
        "cannot list the processes of GPU-A (compute: not supported on this GPU; graphics: not "
        "supported on this GPU); set [[runtimes]] gpus for it if it uses one"
    )


def test_nvml_pids_from_another_pid_namespace_are_named() -> None:
    found = resolve("http://127.0.0.1:8000", gpu_processes=(GpuProcess(98765, "GPU-A"),))
    assert "NVML lists processes this /proc does not show (pids 98765)" in found.reason
    assert "another PID namespace" in found.reason


# --------------------------------------------------------------------------- the /proc shell


def test_without_linux_or_a_socket_table_every_runtime_gets_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "http://127.0.0.1:8000"
    monkeypatch.setattr(sys, "platform", "linux")
    found = discover_replica_gpus([url], [], proc=tmp_path)
    assert found.replicas[url].reason == (
        f"replica discovery cannot read the socket table: {tmp_path}/net/tcp does not exist"
    )
    monkeypatch.setattr(sys, "platform", "darwin")
    found = discover_replica_gpus([url], [GpuProcess(1, "GPU-A")])
    assert found.replicas[url] == ReplicaGpus(
        reason="replica discovery reads Linux's /proc; this is darwin"
    )


def test_a_recorded_proc_tree_is_read_like_the_real_one(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    for name in ("tcp", "tcp6"):
        (tmp_path / "net" / name).write_text((DATA / name).read_text())
    for pid, parent in PARENTS.items():
        (tmp_path / str(pid) / "fd").mkdir(parents=True)
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python3 (x)) S {parent} 1 1 0\n")
    (tmp_path / "100" / "fd" / "3").symlink_to("socket:[40001]")
    (tmp_path / "100" / "fd" / "4").symlink_to("/dev/null")
    (tmp_path / "self").mkdir()  # not a pid: ignored
    found = discover_replica_gpus(["http://127.0.0.1:8000"], ON_GPUS, proc=tmp_path)
    assert found.replicas["http://127.0.0.1:8000"] == ReplicaGpus(
        gpus=("GPU-A", "GPU-B"), pids=(100,)
    )
    assert len(found.skipped) == 3  # the garbage lines of the recorded tables

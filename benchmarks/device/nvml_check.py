"""Device check: run InferMesh's NVML adapter on this machine's real NVIDIA GPUs and print it all.

Prints the driver, every GPU (index, UUID, name, PCI bus id, MIG mode) and its MIG instances,
then each field the `nvml` GPU adapter reads with its value in InferMesh's units, or the reason
NVML gave for not reading it (NotSupported is normal: no ECC on consumer GPUs, no utilisation in
MIG mode). Then the GpuStates the adapter streams (what the agent would gossip: health, throttle
reasons, VRAM headroom) and how long one read takes (median of `--reads`, in the worker thread
the adapter uses). The last line of stdout is one JSON object with the same facts.

    uv run python benchmarks/device/nvml_check.py [--reads 20]

Exit status: 0 after a read, 2 where there is no usable NVML (no nvidia-ml-py, no driver, no
permission), with the reason. Not used by the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext
from infermesh.dcgm.nvml import NvmlAdapter, load_nvml
from infermesh.dcgm.nvml_processes import NvmlProcesses
from infermesh.dcgm.nvml_reader import NvmlReader, NvmlUnavailableError
from infermesh.dcgm.proc_reader import discover_replica_gpus
from infermesh.dcgm.reading import DeviceReading

MIB = 1024 * 1024

# (field of DeviceReading, label, how to show a value); `problems` key when it differs.
FIELDS: list[tuple[str, str, str]] = [
    ("utilization", "utilisation", "{:.0%}"),
    ("memory_used_bytes", "memory used", "mib"),
    ("memory_reserved_bytes", "memory reserved", "mib"),
    ("memory_free_bytes", "memory free", "mib"),
    ("temperature_c", "temperature", "{:.0f} °C"),
    ("power_w", "power", "{:.1f} W"),
    ("power_limit_w", "power limit", "{:.1f} W"),
    ("clock_event_reasons", "clock events", "set"),
    ("ecc_dbe_volatile", "ECC uncorrectable (volatile)", "{}"),
    ("ecc_sbe_volatile", "ECC correctable (volatile)", "{}"),
    ("remapped_rows_pending", "row remap pending", "{}"),
    ("remapped_rows_failure", "row remap failed", "{}"),
    ("xid_last", "last XID (events since start)", "{}"),
]
PROBLEM_KEY = {
    "memory_used_bytes": "memory",
    "memory_reserved_bytes": "memory",
    "memory_free_bytes": "memory",
    "remapped_rows_pending": "remapped_rows",
    "remapped_rows_failure": "remapped_rows",
}


def show(value: Any, style: str) -> str:
    if style == "mib":
        return f"{value / MIB:,.0f} MiB"
    if style == "set":
        return ", ".join(sorted(value)) or "none"
    return style.format(value)


def field_lines(device: DeviceReading) -> tuple[list[str], dict[str, object]]:
    lines: list[str] = []
    facts: dict[str, object] = {}
    for name, label, style in FIELDS:
        value = getattr(device, name)
        if value is not None:
            text = show(value, style)
            facts[name] = sorted(value) if isinstance(value, frozenset) else value
        else:
            reason = device.problems.get(PROBLEM_KEY.get(name, name), "not read")
            text = f"— {reason}"
            facts[name] = {"unsupported": reason}
        lines.append(f"      {label:<32} {text}")
    for key, reason in sorted(device.problems.items()):
        if key not in {PROBLEM_KEY.get(n, n) for n, _, _ in FIELDS}:
            lines.append(f"      {key:<32} — {reason}")
            facts[key] = {"unsupported": reason}
    return lines, facts


def describe(device: DeviceReading) -> str:
    if device.gpu_instance_id:
        return (
            f"  MIG instance GI {device.gpu_instance_id} of GPU {device.index}: "
            f"{device.mig_profile or '(profile unknown)'}  {device.mig_uuid or '(no MIG UUID)'}"
        )
    mig = {True: "enabled", False: "disabled", None: "unknown"}[device.mig_mode]
    return (
        f"GPU {device.index}: {device.model_name}  {device.uuid}  "
        f"pci {device.pci_bus_id or '?'}  MIG {mig}"
    )


async def adapter_states(nvml: Any) -> list[dict[str, object]]:
    adapter = NvmlAdapter(AdapterContext(node="this-node", name="nvml-check", url=""), nvml=nvml)
    try:
        await adapter.poll_once()
        return [
            {
                "gpu": key.gpu_uuid,
                "healthy": state.health[0],
                "reason": state.health[1],
                "throttle_reasons": list(state.throttle_reasons),
                "vram_headroom": round(state.vram_headroom, 4),
                "utilization": state.utilization,
                "mig_profile": state.mig_profile,
            }
            for key, state in sorted(adapter.states.items())
        ]
    finally:
        await adapter.aclose()


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def process_lines(processes: NvmlProcesses) -> tuple[list[str], dict[str, object]]:
    """One line per GPU or MIG instance with the processes NVML lists there, or why none."""
    by_gpu: dict[str, list[int]] = {}
    for process in processes.processes:
        by_gpu.setdefault(process.gpu, []).append(process.pid)
    lines = []
    for gpu in sorted({*by_gpu, *processes.unlisted}):
        pids = by_gpu.get(gpu, [])
        listed = ", ".join(f"{pid} ({command_of(pid)})" for pid in pids) or "none"
        why = processes.unlisted.get(gpu)
        lines.append(f"  {gpu}: {listed}" + (f"  — {why}" if why else ""))
    facts = {"processes": by_gpu, "unlisted": processes.unlisted}
    return lines or ["  (no processes on any GPU)"], facts


def port_lines(reader: NvmlReader, ports: list[int]) -> tuple[list[str], dict[str, object], float]:
    """What the resolver maps each port to, and how long one discovery took (ms)."""
    host = socket.gethostname()  # a host name: a listener on any address of the port counts
    urls = {port: f"http://{host}:{port}" for port in ports}
    started = time.perf_counter()
    processes = reader.running_processes()
    found = discover_replica_gpus(list(urls.values()), processes.processes, processes.unlisted)
    took_ms = (time.perf_counter() - started) * 1000
    lines: list[str] = []
    facts: dict[str, object] = {}
    for port, url in urls.items():
        answer = found.replicas[url]
        server = f" (server pid {', '.join(map(str, answer.pids))})" if answer.pids else ""
        gpus = ", ".join(answer.gpus)
        lines.append(
            f"  port {port}: {gpus}{server}" if gpus else f"  port {port}: — {answer.reason}"
        )
        facts[str(port)] = {
            "gpus": list(answer.gpus),
            "pids": list(answer.pids),
            "reason": answer.reason,
        }
    for line in found.skipped:
        lines.append(f"  skipped socket-table line: {line}")
    return lines, facts, took_ms


async def timed_reads(reader: NvmlReader, reads: int) -> list[float]:
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        await asyncio.to_thread(reader.read)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=20, help="timed reads of every GPU")
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        default=[],
        help="a runtime's port: print the GPUs replica discovery maps it to (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        nvml = load_nvml("nvml_check")
    except ConfigError as exc:
        print(f"nvml_check: {exc}", file=sys.stderr)
        return 2
    reader = NvmlReader(nvml)
    try:
        reader.start()
    except NvmlUnavailableError as exc:
        print(f"nvml_check: no usable NVML on this machine: {exc}", file=sys.stderr)
        return 2
    try:
        reading = reader.read()
        print(f"driver {reading.driver_version or '?'}; {len(reading.devices)} device(s)")
        if reader.xid_problem:
            print(f"XIDs not watched: {reader.xid_problem}")
        devices = []
        for device in reading.devices:
            print(describe(device))
            lines, facts = field_lines(device)
            print("\n".join(lines))
            devices.append(
                {
                    "key": device.key_uuid,
                    "index": device.index,
                    "name": device.model_name,
                    "mig_mode": device.mig_mode,
                    "mig_profile": device.mig_profile,
                    "mig_uuid": device.mig_uuid,
                    "fields": facts,
                }
            )
        for lost in reading.lost:
            print(f"LOST: {lost}")
        times = asyncio.run(timed_reads(reader, max(1, args.reads)))
        print("\nprocesses NVML lists per GPU and MIG instance:")
        lines, process_facts = process_lines(reader.running_processes())
        print("\n".join(lines))
        lines, port_facts, discovery_ms = port_lines(reader, args.port)
        if args.port:
            print(f"\nreplica discovery ({discovery_ms:.1f} ms for NVML and /proc):")
            print("\n".join(lines))
    finally:
        reader.close()
    states = asyncio.run(adapter_states(nvml))
    print("\nGpuStates the nvml adapter streams:")
    for state in states:
        print(
            f"  {state['gpu']}: healthy={state['healthy']} ({state['reason']}), "
            f"throttle={state['throttle_reasons'] or 'none'}, "
            f"VRAM headroom {state['vram_headroom']:.1%}"
        )
    print(
        f"\none read of every GPU: median {statistics.median(times):.2f} ms, "
        f"max {max(times):.2f} ms over {len(times)} reads (worker thread)"
    )
    print(
        json.dumps(
            {
                "driver": reading.driver_version,
                "devices": devices,
                "lost": list(reading.lost),
                "xid_watch_problem": reader.xid_problem,
                "states": states,
                "read_ms_median": round(statistics.median(times), 3),
                "read_ms_max": round(max(times), 3),
                "reads": len(times),
                **process_facts,
                "ports": port_facts,
                "discovery_ms": round(discovery_ms, 3),
            },
            default=str,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

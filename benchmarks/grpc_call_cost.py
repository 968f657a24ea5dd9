"""The floor under router -> agent scoring: what one Python grpc.aio unary call costs here.

Serves the standard gRPC health service (no InferMesh code at all) from a child process on a
Unix socket, calls `Check` from this process at concurrency 1 and 16, and prints calls/s,
p50/p99 latency and the CPU microseconds each side spends per call, plus one JSON line (the last
line of stdout). The InferMesh router makes one such call (`ScoreTargets`) per request, so this
is the least that routing through a separate agent process can add on this machine.

    uv run python benchmarks/grpc_call_cost.py [--calls 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.overhead.loadgen import percentile
from benchmarks.overhead.processes import ProcessGroup, StartError, cpu_seconds_by_group

WARMUP_CALLS = 200


async def serve(socket_path: str) -> None:
    from grpc_health.v1.health import aio as health_aio

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    await server.wait_for_termination()


async def call_phase(
    stub: health_pb2_grpc.HealthStub, calls: int, concurrency: int
) -> tuple[float, list[float], float]:
    """(calls/s, latencies s, client CPU s) for `calls` Check calls at `concurrency`."""
    request = health_pb2.HealthCheckRequest(service="")
    latencies_s: list[float] = []

    async def caller(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            await stub.Check(request)
            latencies_s.append(time.perf_counter() - started)

    cpu_before = time.process_time()
    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(caller(calls // concurrency))
    elapsed_s = time.perf_counter() - started
    return len(latencies_s) / elapsed_s, latencies_s, time.process_time() - cpu_before


async def measure(socket_path: str, server_group: int, calls: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 30.0
        while True:
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                break
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise StartError(f"gRPC server on {socket_path} not ready") from None
                await asyncio.sleep(0.1)
        await call_phase(stub, WARMUP_CALLS, 1)
        for concurrency in (1, 16):
            server_before = cpu_seconds_by_group().get(server_group, float("nan"))
            rate, latencies_s, client_cpu_s = await call_phase(stub, calls, concurrency)
            server_cpu_s = cpu_seconds_by_group().get(server_group, float("nan")) - server_before
            done = len(latencies_s)
            results.append(
                {
                    "concurrency": concurrency,
                    "calls": done,
                    "calls_per_s": round(rate, 1),
                    "p50_ms": round(percentile(latencies_s, 50) * 1000, 3),
                    "p99_ms": round(percentile(latencies_s, 99) * 1000, 3),
                    "client_cpu_us_per_call": round(client_cpu_s / done * 1e6, 1),
                    "server_cpu_us_per_call": round(server_cpu_s / done * 1e6, 1),
                }
            )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="calls per concurrency level")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    if args.calls < 16:
        parser.error("--calls must be >= 16")
    with tempfile.TemporaryDirectory(prefix="imgrpc-") as tmp, ProcessGroup(Path(tmp)) as procs:
        socket_path = str(Path(tmp) / "health.sock")
        server = procs.start(
            "grpc-server", [sys.executable, str(Path(__file__).resolve()), "--serve", socket_path]
        )
        try:
            results = asyncio.run(measure(socket_path, server.popen.pid, args.calls))
        except StartError as exc:
            print(f"{exc}\n{server.log_tail()}", file=sys.stderr)
            return 2
    print(
        f"{'concurrency':>11} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'client us/call':>14} {'server us/call':>14}"
    )
    for row in results:
        print(
            f"{row['concurrency']:>11} {row['calls_per_s']:>8} {row['p50_ms']:>7} "
            f"{row['p99_ms']:>7} {row['client_cpu_us_per_call']:>14} "
            f"{row['server_cpu_us_per_call']:>14}"
        )
    print(
        json.dumps(
            {"benchmark": "grpc_call_cost", "grpcio": grpc.__version__, "results": results},
            separators=(",", ":"),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

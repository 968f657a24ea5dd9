"""Agent memory: the resident size of a real `infermesh agent run` holding N replica states.

Starts one agent on a Unix socket, reads its RSS from /proc, then pushes the seeded candidate
states of benchmarks/decision (one model of N targets per size) through the State API
(`PushModelDeltas`) for each size in turn, and reads the RSS with the running total held.
Prints a table and one JSON line (last line of stdout). Sizing figures in docs/deployment.md
come from it. It measures; it never asserts.

    uv run python benchmarks/agent_memory.py [--sizes 100,1000,10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from benchmarks.decision.states import candidate_deltas
from benchmarks.decision_cost import parse_sizes, push, write_agent_config
from benchmarks.overhead.processes import ProcessGroup

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid` (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def push_all(target: str, sizes: list[int], seed: int, pid: int) -> dict[int, int]:
    """States held -> RSS, after each size's states were applied. Each size is another model
    (benchmarks/decision), so the agent holds the running total of states."""
    out: dict[int, int] = {}
    held = 0
    async with grpc.aio.insecure_channel(target) as channel:
        for size in sizes:
            deltas = candidate_deltas(size, time.time(), seed)
            applied = await push(channel, deltas)
            if applied != size:
                raise RuntimeError(f"the agent applied {applied} of {size} pushed deltas")
            held += size
            await asyncio.sleep(1.0)  # let the agent's metrics and replica bookkeeping settle
            out[held] = rss_bytes(pid)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", type=parse_sizes, default=(100, 1000, 10000))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="infermesh-mem-") as tmp:
        work_dir = Path(tmp)
        config, socket_path = write_agent_config(work_dir)
        argv_agent = [
            sys.executable,
            "-c",
            "from infermesh.core.cli import main; main()",
            "agent",
            "run",
            "--config",
            str(config),
        ]
        with ProcessGroup(work_dir) as procs:
            agent = procs.start("agent", argv_agent)
            deadline = time.monotonic() + args.start_timeout
            while not socket_path.exists():
                if agent.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"agent did not start\n{agent.log_tail()}")
                time.sleep(0.1)
            time.sleep(1.0)
            idle = rss_bytes(agent.popen.pid)
            after = asyncio.run(
                push_all(f"unix://{socket_path}", list(args.sizes), args.seed, agent.popen.pid)
            )
    print(f"{'states held':>15} {'agent RSS MiB':>14}")
    print(f"{0:>15} {idle / MIB:>14.1f}")
    for held, rss in after.items():
        print(f"{held:>15} {rss / MIB:>14.1f}")
    print(
        json.dumps(
            {
                "benchmark": "agent_memory",
                "idle_rss_bytes": idle,
                "rss_bytes_by_states_held": {str(n): rss for n, rss in after.items()},
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Router overhead: the same load direct to emulated vLLM, through InferMesh, through vllm-router.

Starts `--emulators` instant vLLM emulators, an InferMesh agent + router over them, and
vllm-router (PyPI, round_robin) over the same emulators, then drives each mode in turn with a
closed-loop load (fixed concurrency, small non-streaming and streaming chat requests) and prints
a table plus one JSON line (the last line of stdout). With `--variants all` it also serves the
InferMesh router app under granian and uvicorn, with aiohttp and httpx upstream clients.

    uv run python benchmarks/router_overhead.py [--repeats 3] [--variants all]

Every process it starts listens on 127.0.0.1 and is stopped on exit, Ctrl-C included. It never
asserts timings: it measures and reports. See docs/benchmarks.md for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.overhead.loadgen import LoadSpec, chat_body, run_load
from benchmarks.overhead.mesh import ALL_VARIANTS, Mesh, build_mesh, parse_variants
from benchmarks.overhead.processes import ProcessGroup, StartError, cpu_seconds_by_group
from benchmarks.overhead.report import (
    Phase,
    Sample,
    render_goals,
    render_json,
    render_table,
    rows_from_results,
)


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=16,
        help="concurrent clients in the throughput phases",
    )
    parser.add_argument(
        "--latency-concurrency",
        type=int,
        default=1,
        help="concurrency of the latency phases (0 skips them)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=2.5,
        help="measured seconds per phase, mode and repeat",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each measured phase"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="also stop a measured phase after this many requests (0: no cap)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="repeats; every figure is the median over repeats",
    )
    parser.add_argument(
        "--emulators", type=positive_int, default=2, help="instant vLLM emulators behind every mode"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=8,
        help="max_tokens of each request (stream chunks per answer)",
    )
    parser.add_argument("--model", default="bench-model", help="model the emulators serve")
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default="default",
        metavar="default|all|LIST",
        help="extra InferMesh ingress/upstream variants: 'all' or a comma list "
        f"of {', '.join(ALL_VARIANTS)}",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="MODES",
        help="comma list of modes to leave out: infermesh, 'infermesh agent-scoring', vllm-router",
    )
    parser.add_argument(
        "--vllm-router",
        default=None,
        metavar="PATH",
        help="vllm-router executable (default: find it or install it in .bench/)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never install vllm-router, granian or httpx"
    )
    parser.add_argument(
        "--start-timeout",
        type=positive_float,
        default=60.0,
        help="seconds each server may take to become ready",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="keep the servers' logs here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.latency_concurrency < 0:
        parser.error("--latency-concurrency must be >= 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


# --------------------------------------------------------------------------- measuring


def phases_of(args: argparse.Namespace) -> list[Phase]:
    phases = [
        Phase(stream=False, concurrency=args.concurrency),
        Phase(stream=True, concurrency=args.concurrency),
    ]
    if args.latency_concurrency:
        phases += [
            Phase(stream=False, concurrency=args.latency_concurrency),
            Phase(stream=True, concurrency=args.latency_concurrency),
        ]
    return phases


def cpu_roles(mesh: Mesh, mode: str) -> dict[str, list[int]]:
    """Process groups whose CPU time is charged to each role while `mode` is measured."""
    roles = {"emulators": [child.popen.pid for child in mesh.emulators]}
    if mesh.agent is not None:
        roles["agent"] = [mesh.agent.popen.pid]
    if mode in mesh.proxies:
        roles["proxy"] = [mesh.proxies[mode].popen.pid]
    return roles


def run_measured(runner: asyncio.Runner, spec: LoadSpec, roles: dict[str, list[int]]) -> Sample:
    """One load phase, with the CPU time each role spent on it shared out per request."""
    before = cpu_seconds_by_group()
    loadgen_before = time.process_time()
    result = runner.run(run_load(spec))
    loadgen_s = time.process_time() - loadgen_before
    after = cpu_seconds_by_group()
    completed = max(result.completed_total, 1)
    cpu_us: dict[str, float] = {"loadgen": loadgen_s / completed * 1e6}
    for role, groups in roles.items():
        if all(group in before and group in after for group in groups):
            spent_s = sum(after[group] - before[group] for group in groups)
            cpu_us[role] = spent_s / completed * 1e6
    return Sample(load=result, cpu_us_per_request=cpu_us)


def measure(mesh: Mesh, args: argparse.Namespace) -> dict[tuple[str, Phase], list[Sample]]:
    """Every mode under every phase, `repeats` times; modes rotate order between repeats."""
    modes = list(mesh.urls)
    phases = phases_of(args)
    results: dict[tuple[str, Phase], list[Sample]] = {
        (mode, phase): [] for phase in phases for mode in modes
    }
    bodies = {
        stream: chat_body(args.model, stream=stream, max_tokens=args.max_tokens)
        for stream in (False, True)
    }
    with _event_loop_runner() as runner:
        for repeat in range(args.repeats):
            shift = repeat % len(modes)
            order = modes[shift:] + modes[:shift]
            for phase in phases:
                for mode in order:
                    spec = LoadSpec(
                        urls=mesh.urls[mode],
                        body=bodies[phase.stream],
                        stream=phase.stream,
                        concurrency=phase.concurrency,
                        warmup_s=args.warmup,
                        duration_s=args.duration,
                        max_requests=args.max_requests,
                    )
                    sample = run_measured(runner, spec, cpu_roles(mesh, mode))
                    results[(mode, phase)].append(sample)
                    result = sample.load
                    print(
                        f"  repeat {repeat + 1}/{args.repeats} {phase.name:<10} {mode:<28} "
                        f"{result.throughput_rps:8.0f} req/s  p50 {result.latency_ms(50):6.2f} ms"
                        f"  errors {result.errors}",
                        file=sys.stderr,
                    )
    return results


@contextlib.contextmanager
def _event_loop_runner() -> Iterator[asyncio.Runner]:
    """The load generator's loop: uvloop when installed (less client overhead), else asyncio."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


# --------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            work_dir = Path(args.log_dir).resolve()
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imbench-")))
        procs = stack.enter_context(ProcessGroup(work_dir))
        try:
            mesh = build_mesh(procs, args, work_dir)
        except StartError as exc:
            print(f"benchmark could not start: {exc}", file=sys.stderr)
            return 2
        for mode, reason in mesh.skipped.items():
            print(f"NOTE: {mode} not measured: {reason}", file=sys.stderr)
        print(f"measuring {', '.join(mesh.urls)} ...", file=sys.stderr)
        try:
            results = measure(mesh, args)
        except KeyboardInterrupt:
            print("interrupted; stopping servers", file=sys.stderr)
            return 130
    rows = rows_from_results(results)
    for row in rows:
        if row.errors:
            print(
                f"WARNING: {row.mode} {row.phase.name}: {row.errors} failed requests, first: "
                f"{row.first_error}",
                file=sys.stderr,
            )
    settings: dict[str, object] = {
        "concurrency": args.concurrency,
        "latency_concurrency": args.latency_concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "emulators": args.emulators,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "wall_s": round(time.monotonic() - started, 1),
        "modes": mesh.details,
    }
    print(render_table(rows))
    print(
        f"\n+p50/+p99: added over direct in the same phase; x vllm-router: req/s over "
        f"vllm-router's; medians of {args.repeats} repeats; {os.cpu_count()} CPUs shared by "
        f"the load generator and every server."
    )
    print(render_goals(rows))
    print(render_json(rows, settings=settings, skipped=mesh.skipped))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

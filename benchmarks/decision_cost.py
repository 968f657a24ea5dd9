"""Decision cost: what one ScoreTargets decision costs at 10, 100 and 10,000 candidate replicas.

Two paths, one table: `in-process` times `ScoringEngine.rank` directly (the router's local
scoring and the simulator run exactly this), and `agent uds` times a `ScoreTargets` call to a
real `infermesh agent run` process over its Unix socket, after the same seeded candidate states
were pushed through the agent's State API (`PushModelDeltas`). Prints p50/p99 per decision, the
issue's goal (in-process p99 < 1 ms at 10,000 candidates) and one JSON line (last line of stdout).
`--profile` adds a cProfile of the in-process path at the largest size.

    uv run python benchmarks/decision_cost.py [--sizes 10,100,10000] [--decisions 1000]

It measures and reports; it never asserts timings. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attrs
import grpc

from benchmarks.decision.report import (
    IN_PROCESS,
    UDS,
    Row,
    render_json,
    render_table,
    row_from_samples,
)
from benchmarks.decision.states import candidate_deltas, model_for, requests, telemetry_updates
from benchmarks.overhead.processes import ProcessGroup
from infermesh.core.config import ScoringConfig
from infermesh.core.convert import model_delta_to_pb, request_features_to_pb
from infermesh.core.model import ModelStateDelta, RequestFeatures
from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2_grpc, types_pb2
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore

WARMUP_DECISIONS = 20
MIN_DECISIONS = 100


def parse_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=parse_sizes, default="10,100,10000", help="candidate replica counts"
    )
    parser.add_argument(
        "--decisions", type=int, default=1000, help="timed decisions per path and size"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=5.0,
        help=f"stop a path/size after this long (at least {MIN_DECISIONS} decisions are timed)",
    )
    parser.add_argument(
        "--max-targets", type=int, default=3, help="targets asked for per decision (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of candidates and requests")
    parser.add_argument(
        "--max-candidates",
        type=int,
        default=ScoringConfig().max_candidates,
        help="scoring.max_candidates of the in-process engine (0: score every candidate)",
    )
    parser.add_argument(
        "--deltas-per-decision",
        type=int,
        default=0,
        help="in-process: apply this many fresh telemetry deltas (untimed) before each decision, "
        "as a live fleet's scrapes land between decisions",
    )
    parser.add_argument(
        "--paths",
        default=f"{IN_PROCESS},{UDS}",
        help=f"comma list of paths to measure: {IN_PROCESS}, {UDS}",
    )
    parser.add_argument(
        "--profile", action="store_true", help="cProfile the in-process path at the largest size"
    )
    parser.add_argument("--start-timeout", type=float, default=60.0, help="agent start timeout")
    args = parser.parse_args(argv)
    if args.decisions < MIN_DECISIONS:
        parser.error(f"--decisions must be >= {MIN_DECISIONS}")
    if args.max_targets < 0:
        parser.error("--max-targets must be >= 0")
    if args.max_candidates < 0:
        parser.error("--max-candidates must be >= 0")
    if args.deltas_per_decision < 0:
        parser.error("--deltas-per-decision must be >= 0")
    if not args.max_seconds > 0:
        parser.error("--max-seconds must be > 0")
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    unknown = [p for p in paths if p not in (IN_PROCESS, UDS)]
    if unknown or not paths:
        parser.error(f"--paths: unknown path(s) {', '.join(unknown) or '(none)'}")
    args.paths = paths
    return args


# --------------------------------------------------------------------------- in-process


def build_engine(
    deltas: Sequence[ModelStateDelta], max_candidates: int | None = None
) -> ScoringEngine:
    """The router's local scoring engine (built-in scorers, default `[scoring]`, or that with
    `max_candidates`) over `deltas`."""
    store = StateStore()
    for delta in deltas:
        store.apply_model_delta(delta)
    registered = {scorer.name: scorer for scorer in builtin_scorers()}
    scoring = ScoringConfig()
    if max_candidates is not None:
        scoring = attrs.evolve(scoring, max_candidates=max_candidates)
    return ScoringEngine.from_config(store, InflightTracker(), registered, scoring)


def time_in_process(
    engine: ScoringEngine,
    features: Sequence[RequestFeatures],
    now: float,
    args: argparse.Namespace,
    cpu_times: list[float] | None = None,
    updates: Iterator[ModelStateDelta] | None = None,
) -> list[float]:
    """Wall-clock seconds per decision; each decision's thread CPU seconds are appended to
    `cpu_times` when given. With `updates`, `args.deltas_per_decision` of them are applied to
    the engine's store (untimed) before each decision."""
    store = engine.store
    per_decision = args.deltas_per_decision if updates is not None else 0

    def land_deltas() -> None:
        if updates is not None:
            for _ in range(per_decision):
                store.apply_model_delta(next(updates))

    for request in features[:WARMUP_DECISIONS]:
        land_deltas()
        engine.rank(request, now, args.max_targets)
    latencies: list[float] = []
    stop_at = time.perf_counter() + args.max_seconds
    thread_time = time.thread_time
    for index in range(args.decisions):
        request = features[index % len(features)]
        land_deltas()
        cpu_started = thread_time()
        started = time.perf_counter()
        ranking = engine.rank(request, now, args.max_targets)
        latencies.append(time.perf_counter() - started)
        if cpu_times is not None:
            cpu_times.append(thread_time() - cpu_started)
        if not ranking.targets:
            raise RuntimeError(f"no target ranked: {ranking.excluded[:3]}")
        if len(latencies) >= MIN_DECISIONS and time.perf_counter() > stop_at:
            break
    return latencies


def profile_in_process(
    engine: ScoringEngine, features: Sequence[RequestFeatures], now: float, max_targets: int
) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for request in features[:200]:
        engine.rank(request, now, max_targets)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    return out.getvalue()


# --------------------------------------------------------------------------- agent over UDS


def write_agent_config(work_dir: Path) -> tuple[Path, Path]:
    socket_path = work_dir / "agent.sock"
    config = work_dir / "agent.toml"
    config.write_text(
        "\n".join(
            [
                "[node]",
                'id = "decision-bench"',
                "",
                "[agent]",
                f'socket = "{socket_path}"',
                'metrics_listen = ""',
                "",
                "[logging]",
                'level = "warning"',
                "",
                "[scoring]",
                "stale_after_s = 86400.0",  # pushed states stay fresh for the whole run
            ]
        )
        + "\n"
    )
    return config, socket_path


async def push(channel: grpc.aio.Channel, deltas: Sequence[ModelStateDelta]) -> int:
    stub = state_pb2_grpc.StateStub(channel)

    async def stream() -> AsyncIterator[types_pb2.ModelStateDelta]:
        for delta in deltas:
            yield model_delta_to_pb(delta)

    ack = await stub.PushModelDeltas(stream())
    return int(ack.applied)


async def time_uds(
    target: str,
    sizes: Sequence[int],
    args: argparse.Namespace,
) -> dict[int, list[float]]:
    results: dict[int, list[float]] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        for size in sizes:
            deltas = candidate_deltas(size, time.time(), args.seed)  # the agent's clock: wall
            applied = await push(channel, deltas)
            if applied != size:
                raise RuntimeError(f"the agent applied {applied} of {size} pushed deltas")
            messages = [
                scoring_pb2.ScoreTargetsRequest(
                    request=request_features_to_pb(request), max_targets=args.max_targets
                )
                for request in requests(model_for(size), 256, args.seed)
            ]
            for message in messages[:WARMUP_DECISIONS]:
                await scoring.ScoreTargets(message)
            latencies: list[float] = []
            stop_at = time.perf_counter() + args.max_seconds
            for index in range(args.decisions):
                message = messages[index % len(messages)]
                started = time.perf_counter()
                response = await scoring.ScoreTargets(message)
                latencies.append(time.perf_counter() - started)
                if not response.targets:
                    raise RuntimeError(f"no target ranked: {list(response.excluded)[:3]}")
                if len(latencies) >= MIN_DECISIONS and time.perf_counter() > stop_at:
                    break
            results[size] = latencies
            print(f"  {UDS} {size}: {len(latencies)} decisions", file=sys.stderr)
    return results


def measure_uds(args: argparse.Namespace, work_dir: Path) -> dict[int, list[float]]:
    config, socket_path = write_agent_config(work_dir)
    argv = [
        sys.executable,
        "-c",
        "from infermesh.core.cli import main; main()",
        "agent",
        "run",
        "--config",
        str(config),
    ]
    with ProcessGroup(work_dir) as procs:
        agent = procs.start("agent", argv)
        deadline = time.monotonic() + args.start_timeout
        while not socket_path.exists():
            if agent.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"agent did not create {socket_path} (exit status {agent.popen.poll()})\n"
                    f"{agent.log_tail()}"
                )
            time.sleep(0.1)
        return asyncio.run(time_uds(f"unix://{socket_path}", args.sizes, args))


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    now = 1_000_000.0  # in-process: a fixed virtual time, as the simulator would pass
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    profile = ""
    if IN_PROCESS in args.paths:
        for size in args.sizes:
            deltas = candidate_deltas(size, now, args.seed)
            engine = build_engine(deltas, args.max_candidates)
            features = requests(model_for(size), 256, args.seed)
            cpu_times: list[float] = []
            updates = telemetry_updates(deltas, args.seed)
            latencies = time_in_process(engine, features, now, args, cpu_times, updates)
            rows.append(row_from_samples(IN_PROCESS, size, latencies, cpu_times))
            print(f"  {IN_PROCESS} {size}: {len(latencies)} decisions", file=sys.stderr)
            if args.profile and size == max(args.sizes):
                profile = profile_in_process(engine, features, now, args.max_targets)
    if UDS in args.paths:
        with tempfile.TemporaryDirectory(prefix="imdecide-") as work_dir:
            try:
                by_size = measure_uds(args, Path(work_dir))
            except (RuntimeError, grpc.RpcError) as exc:
                skipped[UDS] = str(exc)
                print(f"NOTE: {UDS} not measured: {exc}", file=sys.stderr)
            else:
                rows += [row_from_samples(UDS, size, by_size[size]) for size in args.sizes]
    settings: dict[str, object] = {
        "sizes": list(args.sizes),
        "decisions": args.decisions,
        "max_targets": args.max_targets,
        "max_candidates": args.max_candidates,
        "deltas_per_decision": args.deltas_per_decision,
        "seed": args.seed,
        "scorers": sorted(scorer.name for scorer in builtin_scorers()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wall_s": round(time.monotonic() - started, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    print(render_table(rows))
    print(
        f"\nper decision; max_targets {args.max_targets}; max_candidates {args.max_candidates} "
        f"(in-process); {args.deltas_per_decision} telemetry deltas landed before each "
        f"in-process decision; built-in scorers, default weights; "
        f"{os.cpu_count()} CPUs; {UDS}: one unary ScoreTargets call at a time, client included; "
        f"cpu: the deciding thread's CPU time (in-process), which a loaded machine's waits for "
        f"a CPU do not inflate; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}."
    )
    if profile:
        print(f"\ncProfile of the in-process path at {max(args.sizes):,} candidates:\n{profile}")
    print(render_json(rows, settings=settings, skipped=skipped))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)

"""Routing quality, live: one open-loop trace through InferMesh and through vllm-router's policies.

For each mode it starts a cold emulated fleet on loopback (heterogeneous GPU profiles, one of
them degraded: `--fleet h100,a100,a10,h100@0.25` runs the last H100 at a quarter of its speed via
the emulator's `POST /dev/speed`), puts the mode's router in front, sends the same seeded
open-loop trace (Poisson arrivals, shared-prefix multi-tenant chat, all streamed) and stops
everything again. Modes: the InferMesh agent + router (`infermesh router run`, defaults) and
`vllm-router` with `round_robin`, `power_of_two` and `cache_aware`. Prints TTFT p50/p95/p99,
end-to-end latency and throughput (req/s, tok/s and `tok/s arr`: output tokens delivered while
requests arrived) side by side, each mode's split over the replicas, the issue's
goals, and one JSON line (the last line of stdout).

    uv run python benchmarks/routing_quality.py [--requests 360] [--rate 16] [--seeds 7,11]

With `--seeds` it runs the whole comparison once per seed (a new trace each) and then prints
the figures pooled over the seeds: each mode's percentiles over all its requests.

Every process listens on 127.0.0.1 and is stopped on exit, Ctrl-C included. It measures and
reports; it never asserts timings. See docs/benchmarks.md.
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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.overhead.processes import ProcessGroup, StartError
from benchmarks.quality.fleet import (
    VLLM_ROUTER_POLICIES,
    Replica,
    fetch_request_logs,
    mode_name,
    parse_fleet,
    start_fleet,
    start_router,
)
from benchmarks.quality.report import (
    INFERMESH,
    Row,
    render_goals,
    render_json,
    render_table,
    row_from_report,
    row_from_reports,
)
from benchmarks.quality.requests import PerRequest, join_requests, render_tail, tail_summary
from benchmarks.quality.requests import to_jsonl as per_request_jsonl
from infermesh.dev.loadgen import LoadReport, LoadSpec, PromptMix, run_load

ROUTERS = (INFERMESH, *VLLM_ROUTER_POLICIES)
DEFAULT_FLEET = "h100,a100,a10,h100@0.25"


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_routers(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ROUTERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown router(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(ROUTERS)}"
        )
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--fleet",
        type=parse_fleet,
        default=DEFAULT_FLEET,
        metavar="PROFILE[@SPEED],...",
        help="one emulated replica per item; @F runs it at F of its profile's speed (degraded)",
    )
    parser.add_argument(
        "--routers",
        type=parse_routers,
        default=",".join(ROUTERS),
        help="comma list of modes: infermesh and vllm-router policies",
    )
    parser.add_argument(
        "--requests", type=positive_int, default=360, help="requests in the trace (every mode)"
    )
    parser.add_argument(
        "--rate", type=positive_float, default=16.0, help="Poisson arrival rate, requests/s"
    )
    parser.add_argument("--tenants", type=positive_int, default=8, help="shared system prompts")
    parser.add_argument(
        "--prefix-chars",
        type=positive_int,
        default=6000,
        help="length of each tenant's system prompt (about a quarter as many tokens)",
    )
    parser.add_argument(
        "--max-tokens", type=positive_int, default=48, help="output tokens per request"
    )
    parser.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=512,
        help="cap on requests in flight at the client (open loop while below it)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the trace")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        metavar="S,S,...",
        help="run once per seed, then print the figures pooled over them (overrides --seed)",
    )
    parser.add_argument("--model", default="bench-model", help="model the emulators serve")
    parser.add_argument(
        "--vllm-router",
        default=None,
        metavar="PATH",
        help="vllm-router executable (default: find it or install it in .bench/)",
    )
    parser.add_argument("--no-install", action="store_true", help="never install vllm-router")
    parser.add_argument(
        "--start-timeout",
        type=positive_float,
        default=60.0,
        help="seconds each server may take to become ready",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=2.0,
        help="seconds between a mode's router answering and its trace (telemetry first scrape)",
    )
    parser.add_argument(
        "--log-dir", default=None, help="keep the servers' logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--no-gpu-telemetry",
        action="store_true",
        help="run the fleet without the emulated dcgm-exporter: the degraded replica is slowed "
        "but no GPU telemetry says so (InferMesh then sees only the runtimes' metrics)",
    )
    parser.add_argument(
        "--per-request",
        default=None,
        metavar="FILE",
        help="write one JSON line per request (every seed and mode): replica, cold/warm, "
        "queue wait, prefill, time outside the engine",
    )
    args = parser.parse_args(argv)
    if args.settle < 0:
        parser.error("--settle must be >= 0")
    return args


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a comma list of integers, e.g. 7,11,13; got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"names a seed twice: {text!r}")
    return seeds


def trace_spec(base_url: str, args: argparse.Namespace) -> LoadSpec:
    """The trace every mode gets: same seed, so the same arrivals, tenants and prompts."""
    return LoadSpec(
        base_url=base_url,
        model=args.model,
        concurrency=args.max_in_flight,
        duration_s=None,
        num_requests=args.requests,
        rate_per_s=args.rate,
        stream_fraction=1.0,
        max_tokens=args.max_tokens,
        mix=PromptMix(num_prefixes=args.tenants, prefix_chars=args.prefix_chars),
        seed=args.seed,
    )


def measure_mode(
    router: str, replicas: Sequence[Replica], args: argparse.Namespace, log_dir: Path
) -> tuple[LoadReport | None, str, str, list[PerRequest]]:
    """(report, detail, why skipped, per-request rows): one cold fleet + router, the trace,
    the replicas' request logs, everything stopped."""
    mode = mode_name(router)
    mode_dir = log_dir / f"seed{args.seed}" / mode.replace(" ", "-")
    mode_dir.mkdir(parents=True, exist_ok=True)
    with ProcessGroup(mode_dir) as procs:
        try:
            fleet = start_fleet(procs, replicas, args)
            up = start_router(procs, router, fleet, args, mode_dir)
        except StartError as exc:
            return None, "", str(exc), []
        time.sleep(args.settle)
        print(f"  {mode}: sending {args.requests} requests at {args.rate:g}/s ...", file=sys.stderr)
        report = asyncio.run(run_load(trace_spec(up.base_url, args)))
        per_request = join_requests(
            args.seed, mode, report.records, fetch_request_logs(fleet.bases)
        )
    row = row_from_report(mode, report)
    print(
        f"  {mode}: TTFT p95 {row.ttft_p95_ms:.0f} ms, {row.ok_per_s:.2f} req/s, "
        f"{row.window_tokens_per_s:.0f} tok/s arr, {row.errors} errors",
        file=sys.stderr,
    )
    return report, up.detail, "", per_request


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    replicas: tuple[Replica, ...] = args.fleet
    seeds: tuple[int, ...] = args.seeds or (args.seed,)
    reports: dict[str, list[LoadReport]] = {}
    details: dict[str, str] = {}
    skipped: dict[str, str] = {}
    per_request: list[PerRequest] = []
    fleet = ", ".join(r.label for r in replicas)
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            log_dir = Path(args.log_dir).resolve()
            log_dir.mkdir(parents=True, exist_ok=True)
        else:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imquality-")))
        print(f"fleet per mode: {fleet}", file=sys.stderr)
        try:
            for seed in seeds:
                args.seed = seed
                rows: list[Row] = []
                for router in args.routers:
                    mode = mode_name(router)
                    if mode in skipped:
                        continue
                    report, detail, why, rows_of_mode = measure_mode(
                        router, replicas, args, log_dir
                    )
                    per_request += rows_of_mode
                    if report is None:
                        skipped[mode] = why
                        print(f"NOTE: {mode} not measured: {why}", file=sys.stderr)
                        continue
                    reports.setdefault(mode, []).append(report)
                    rows.append(row_from_report(mode, report))
                    details[mode] = detail
                if len(seeds) > 1:
                    print(f"seed {seed}:")
                    print(render_table(rows))
                    print(render_goals(rows))
                    print(render_tail(tail_summary([r for r in per_request if r.seed == seed])))
                    print()
        except KeyboardInterrupt:
            print("interrupted; stopping servers", file=sys.stderr)
            return 130
    rows = [row_from_reports(mode, mode_reports) for mode, mode_reports in reports.items()]
    for row in rows:
        if row.errors:
            print(
                f"WARNING: {row.mode}: {row.errors} failed requests, first: {row.first_error}",
                file=sys.stderr,
            )
    settings: dict[str, object] = {
        "fleet": [r.label for r in replicas],
        "requests": args.requests,
        "rate_per_s": args.rate,
        "tenants": args.tenants,
        "prefix_chars": args.prefix_chars,
        "max_tokens": args.max_tokens,
        "gpu_telemetry": not args.no_gpu_telemetry,
        "seed": seeds[0] if len(seeds) == 1 else None,
        "seeds": list(seeds),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "wall_s": round(time.monotonic() - started, 1),
        "modes": details,
    }
    if len(seeds) > 1:
        print(f"pooled over seeds {', '.join(map(str, seeds))}:")
    print(render_table(rows))
    traces = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    print(
        f"\nTTFT and e2e in ms over streamed requests; every mode: a cold fleet of {fleet}, "
        f"{args.requests} requests at {args.rate:g}/s ({traces}), "
        f"{os.cpu_count()} CPUs shared by the client and every server.\n"
        f"req/s and tok/s: completed requests and their output tokens over first send to last "
        f"completion (the offered rate plus the last straggler's e2e). tok/s arr: output tokens "
        f"delivered within first send to last send, over that window; sent/s: requests sent "
        f"in it per second, so about sent/s x {args.max_tokens} tok/s are offered and a mode "
        f"that keeps up delivers about that. The throughput goal is judged on tok/s arr."
    )
    print(render_goals(rows))
    print(render_tail(tail_summary(per_request)))
    if args.per_request:
        Path(args.per_request).write_text(per_request_jsonl(per_request))
        print(f"per-request records: {args.per_request}", file=sys.stderr)
    print(render_json(rows, settings=settings, skipped=skipped))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

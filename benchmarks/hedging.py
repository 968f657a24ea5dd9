"""Hedging against a stalling replica: the same load with router hedging off, then on.

Starts four emulated vLLM replicas (`infermesh dev vllm`), one of which holds a random
`--stall-prob` (default 10%) of its requests `--stall-s` (default 2 s) before its first token,
an InferMesh agent and router over them, and sends a closed-loop load of streamed chat requests
through the router: once with `[router.hedging] enabled = false`, once with the defaults (hedge
at the learnt p95 TTFT, budget 10% of requests). Prints a table and one JSON line (the last line
of stdout): client TTFT p50/p95/p99, upstream requests per client request (the extra load), the
router's hedge counters, and how many stalls the stalling replica served.

    uv run python benchmarks/hedging.py [--requests 1000] [--concurrency 8]

Every process it starts listens on 127.0.0.1 and is stopped on exit. It never asserts timings:
it measures and reports. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from collections.abc import Sequence

import aiohttp
import attrs
from prometheus_client.parser import text_string_to_metric_families

from infermesh.dev.harness import LocalMesh, MeshSpec, ReplicaSpec
from infermesh.dev.loadgen import LoadSpec, percentile, run_load
from infermesh.dev.profiles import DEFAULT_MODEL, PROFILES

REPLICAS = 4
GOAL_P99_RATIO = 3.0
GOAL_EXTRA_LOAD = 0.10


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per mode")
    parser.add_argument("--warmup", type=int, default=60, help="requests before measuring")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument("--stall-prob", type=float, default=0.1, help="stalling replica's share")
    parser.add_argument("--stall-s", type=float, default=2.0, help="length of one stall")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h100")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 0:
        parser.error("--requests and --concurrency must be >= 1, --warmup >= 0")
    return args


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed `name{labels}` (labels sorted)."""
    async with session.get(url) as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


async def counters(mesh: LocalMesh) -> dict[str, float]:
    """Emulator counters per replica (`<replica>:<counter>`) and the router's hedge counters."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession() as session:
        for replica in mesh.replicas:
            page = await scrape(session, f"{replica.url}/metrics")
            for name in ("requests", "stalls", "cancelled"):
                out[f"{replica.name}:{name}"] = page.get(f"infermesh_emulator_{name}_total{{}}", 0)
        page = await scrape(session, f"{mesh.router_url}/metrics")
        for key, value in page.items():
            if key.startswith(("infermesh_router_hedges_total", "infermesh_router_retries")):
                out[key] = value
    return out


async def run_mode(args: argparse.Namespace, hedging: bool) -> dict[str, object]:
    stall = ("--stall-prob", str(args.stall_prob), "--stall-s", str(args.stall_s))
    replicas = tuple(
        ReplicaSpec(args.profile, f"r{i}", extra_args=stall if i == 0 else ())
        for i in range(REPLICAS)
    )
    spec = MeshSpec(
        replicas=replicas,
        model=DEFAULT_MODEL,
        log_level="warning",
        ready_timeout_s=120.0,
        extra_config=f"[router.hedging]\nenabled = {'true' if hedging else 'false'}\n",
    )
    async with LocalMesh(spec) as mesh:
        load = LoadSpec(
            base_url=mesh.router_url,
            model=DEFAULT_MODEL,
            concurrency=args.concurrency,
            duration_s=None,
            num_requests=args.requests,
            stream_fraction=1.0,
            max_tokens=args.max_tokens,
        )
        if args.warmup:
            await run_load(attrs.evolve(load, num_requests=args.warmup, seed=1))
        before = await counters(mesh)
        report = await run_load(load)
        after = await counters(mesh)
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    ok = [r for r in report.records if r.ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    upstream = sum(delta[f"{r.name}:requests"] for r in mesh.replicas)
    hedges = {
        event: int(delta.get(f"infermesh_router_hedges_total{{event={event}}}", 0))
        for event in ("fired", "won", "cancelled", "denied_by_budget", "denied_saturated")
    }
    return {
        "mode": "hedging on" if hedging else "hedging off",
        "requests": len(report.records),
        "ok": len(ok),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "ttft_p99_s": percentile(ttfts, 99),
        "ttft_p999_s": percentile(ttfts, 99.9),
        "ttft_max_s": max(ttfts) if ttfts else None,
        "stalled_at_client": sum(1 for t in ttfts if t >= args.stall_s / 2),
        "upstream_requests": int(upstream),
        "extra_load": upstream / len(report.records) - 1.0 if report.records else None,
        "stalling_replica_requests": int(delta["r0:requests"]),
        "stalls": int(delta["r0:stalls"]),
        "cancelled_upstream": int(sum(delta[f"{r.name}:cancelled"] for r in mesh.replicas)),
        "hedges": hedges,
    }


def _ms(value: object) -> str:
    return f"{float(value) * 1000:8.1f}" if isinstance(value, float) else "       -"


def render(rows: list[dict[str, object]]) -> str:
    header = (
        f"{'mode':<12} {'ok/req':>9} {'TTFT p50':>9} {'p95':>8} {'p99':>8} {'max':>8} {'slow':>5} "
        f"{'upstream':>9} {'extra':>7} {'to r0':>6} {'stalls':>6} {'hedges f/w/c/denied':>20}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        h = row["hedges"]
        assert isinstance(h, dict)
        extra = row["extra_load"]
        lines.append(
            f"{row['mode']:<12} {row['ok']:>4}/{row['requests']:<4} {_ms(row['ttft_p50_s'])} "
            f"{_ms(row['ttft_p95_s'])} {_ms(row['ttft_p99_s'])} {_ms(row['ttft_max_s'])} "
            f"{row['stalled_at_client']:>5} "
            f"{row['upstream_requests']:>9} "
            f"{(f'{extra:+.1%}' if isinstance(extra, float) else '-'):>7} "
            f"{row['stalling_replica_requests']:>6} {row['stalls']:>6} "
            f"{h['fired']:>5}/{h['won']}/{h['cancelled']}/"
            f"{h['denied_by_budget'] + h['denied_saturated']}"
        )
    lines.append(
        "(TTFT in ms at the client: first content token of a streamed chat answer; slow: "
        "requests whose TTFT was at least half a stall; to r0: requests the stalling replica "
        "got, stalls: how many it stalled)"
    )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    rows = [await run_mode(args, hedging=False), await run_mode(args, hedging=True)]
    print(render(rows), flush=True)
    off, on = rows
    p99_off, p99_on = off["ttft_p99_s"], on["ttft_p99_s"]
    ratio = (
        p99_off / p99_on
        if isinstance(p99_off, float) and isinstance(p99_on, float) and p99_on > 0
        else None
    )
    extra = on["extra_load"]
    goal_met = (
        ratio is not None
        and ratio >= GOAL_P99_RATIO
        and isinstance(extra, float)
        and extra <= GOAL_EXTRA_LOAD
    )
    ratio_text = f"{ratio:.1f}x" if ratio is not None else "n/a"
    extra_text = f"{extra:+.1%}" if isinstance(extra, float) else "n/a"
    print(
        f"p99 TTFT off/on: {ratio_text} (goal >= {GOAL_P99_RATIO:g}x); extra upstream requests "
        f"with hedging: {extra_text} (goal <= {GOAL_EXTRA_LOAD:.0%}) -> "
        f"{'goal met' if goal_met else 'goal NOT met'}",
        flush=True,
    )
    return {
        "benchmark": "hedging",
        "replicas": REPLICAS,
        "profile": args.profile,
        "stall_prob": args.stall_prob,
        "stall_s": args.stall_s,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "python": platform.python_version(),
        "modes": rows,
        "p99_ttft_ratio": ratio,
        "goal_met": goal_met,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    print(json.dumps(result, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`infermesh sim route`: option parsing and printing; the simulation is imported when run."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["route_command"]

SWEEP_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.25)


@click.command("route")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Engine-model replicas behind the router.",
)
@click.option(
    "--workload",
    default="mixed",
    show_default=True,
    help="short, chat, bursty, sessions, long_context or mixed.",
)
@click.option(
    "--trace",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Replay this JSONL trace instead of a workload (--duration/--rate are ignored).",
)
@click.option(
    "--strategies",
    default="infermesh,round_robin",
    show_default=True,
    help="Comma-separated: infermesh, round_robin, random, least_request, power_of_two,"
    " cache_aware, llmd.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same numbers.")
@click.option(
    "--seeds",
    default=None,
    help="Comma-separated seeds (e.g. 1,2,3): run each and report the median of each column"
    " (counts are totals); the JSON keeps every seed's rows. Overrides --seed.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds of arrivals; the fleet then drains.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    help="Mean arrivals per second [default: 1.2 per replica].",
)
@click.option(
    "--profiles",
    default="h100,a100,a10",
    show_default=True,
    help="GPU profile of each node of 8 replicas, in turn.",
)
@click.option(
    "--degraded",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Replicas (drawn by the seed) that run slower than their profile.",
)
@click.option(
    "--degraded-speed",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.3,
    show_default=True,
    help="Fraction of its profile's speed a degraded replica runs at.",
)
@click.option(
    "--scrape-interval",
    type=click.FloatRange(min=0.001),
    default=0.5,
    show_default=True,
    help="Seconds between two telemetry scrapes of a replica.",
)
@click.option(
    "--telemetry-delay",
    type=click.FloatRange(min=0.0),
    default=0.05,
    show_default=True,
    help="Seconds from a scrape to the router (agent delta + gossip).",
)
@click.option("--rtt-ms", default="0.2,4", show_default=True, help="Per-node RTT range MIN,MAX.")
@click.option(
    "--kv-blocks-cap",
    type=click.IntRange(min=1),
    default=None,
    help="Cap each replica's KV blocks (memory at 10,000 replicas) [default: the profile's].",
)
@click.option(
    "--cell-size",
    type=click.IntRange(min=1),
    default=None,
    help="Split InferMesh's routing into cells of this many replicas [default: one cell].",
)
@click.option(
    "--gpu-telemetry/--no-gpu-telemetry",
    default=True,
    show_default=True,
    help="Scrapes carry each GPU's state (DCGM's view; the degraded GPU reports thermal"
    " throttling) to InferMesh's store.",
)
@click.option(
    "--admission/--no-admission",
    default=True,
    show_default=True,
    help="InferMesh's routers run admission (SLO-class slots and queues, saturation shedding).",
)
@click.option(
    "--hedging/--no-hedging",
    default=True,
    show_default=True,
    help="InferMesh's routers hedge requests with no first token after the learnt delay.",
)
@click.option(
    "--routers",
    type=click.IntRange(min=1),
    default=None,
    help="Router processes in front of the fleet (admission and hedge state each)"
    " [default: one per node of 8 replicas].",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write route.json and PNG plots (with infermesh-dev[plots]) here.",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Run the strategies in this many processes (same numbers).",
)
@click.option("--sweep", is_flag=True, help="Also run at 0.25-1.25x the rate: p95 TTFT vs load.")
def route_command(
    replicas: int,
    workload: str,
    trace: Path | None,
    strategies: str,
    seed: int,
    seeds: str | None,
    duration: float,
    rate: float | None,
    profiles: str,
    degraded: int,
    degraded_speed: float,
    scrape_interval: float,
    telemetry_delay: float,
    rtt_ms: str,
    kv_blocks_cap: int | None,
    cell_size: int | None,
    gpu_telemetry: bool,
    admission: bool,
    hedging: bool,
    routers: int | None,
    out: Path | None,
    jobs: int,
    sweep: bool,
) -> None:
    """Route one workload over REPLICAS engine-model replicas with each strategy in turn.

    The same requests, GPUs, RTTs and degraded replica for every strategy; InferMesh's strategy
    runs the live system's state store, in-flight tracker and scorers, behind routers that run
    the live admission and hedging.
    """
    import random

    from infermesh.dev.sim.route.report import (
        format_table,
        plot_cdf,
        plot_sweep,
        report_dict,
        write_json,
    )
    from infermesh.dev.sim.route.runner import RouteSimSettings, run_seeds, run_sweep
    from infermesh.dev.sim.route.world import FleetSpec, build_views

    try:
        low_ms, high_ms = (float(x) for x in rtt_ms.split(","))
        fleet = FleetSpec(
            replicas=replicas,
            profiles=tuple(p.strip() for p in profiles.split(",") if p.strip()),
            degraded=degraded,
            degraded_speed=degraded_speed,
            rtt_min_s=low_ms / 1000,
            rtt_max_s=high_ms / 1000,
            scrape_interval_s=scrape_interval,
            telemetry_delay_s=telemetry_delay,
            kv_blocks_cap=kv_blocks_cap,
            gpu_telemetry=gpu_telemetry,
        )
        seed_list = _seeds(seeds) if seeds is not None else [seed]
        seed = seed_list[0]
        settings = RouteSimSettings(
            fleet=fleet,
            strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
            workload=workload,
            trace=trace,
            duration_s=duration,
            rate=rate if rate is not None else 1.2 * replicas,
            seed=seed,
            cell_size=cell_size,
            admission=admission,
            hedging=hedging,
            routers=routers,
        )
        runs = run_seeds(settings, seed_list, jobs=jobs)
    except (ValueError, KeyError) as exc:
        raise click.UsageError(str(exc)) from exc
    metrics = runs.median
    points = run_sweep(settings, SWEEP_FACTORS, jobs) if sweep else []
    degraded_ids = build_views(fleet, random.Random(seed))[1]
    per_seed = runs.per_seed if len(seed_list) > 1 else None
    report = report_dict(settings, metrics, points, degraded_ids, per_seed)
    if per_seed:
        click.echo(f"median over seeds {', '.join(map(str, seed_list))} (counts: totals)")
    click.echo(format_table(metrics))
    if report["goals"]:
        click.echo("goals: " + ", ".join(f"{k}={v}" for k, v in report["goals"].items()))
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "route.json")
    click.echo(f"wrote {out / 'route.json'}")
    seeds_label = f"seed {seed}" if len(seed_list) == 1 else f"seeds {seeds}"
    title = f"{trace.name if trace else workload}, {replicas} replicas, {seeds_label}"
    try:
        plot_cdf(metrics, out / "ttft_cdf.png", f"TTFT CDF: {title}")
        if points:
            plot_sweep(points, out / "ttft_vs_load.png", f"p95 TTFT vs load: {title}")
    except ImportError:
        click.echo("no plots: install infermesh-dev[plots] (matplotlib)", err=True)


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"--seeds takes comma-separated integers like 1,2,3, got {text!r}"
        raise ValueError(message) from None
    if not seeds:
        raise ValueError("--seeds needs at least one seed, like 1,2,3")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds repeats a seed: {text!r}")
    return seeds

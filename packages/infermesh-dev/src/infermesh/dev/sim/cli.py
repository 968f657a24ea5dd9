"""The `infermesh sim` command group and `infermesh sim gossip`.

Option parsing and printing only; the simulation is imported inside the command so that
`infermesh --help` stays fast.
"""

from __future__ import annotations

import click

from infermesh.dev.sim.network import PROFILES
from infermesh.dev.sim.route.cli import route_command

__all__ = ["sim_group"]


@click.group("sim")
def sim_group() -> None:
    """Simulations of InferMesh's real state machines on a simulated network, in virtual time."""


@sim_group.command("gossip")
@click.option(
    "--nodes",
    type=click.IntRange(min=4),
    default=1000,
    show_default=True,
    help="Cluster size, the joining node included.",
)
@click.option(
    "--loss",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of datagrams lost, uniformly at random.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.0, min_open=True),
    default=60.0,
    show_default=True,
    help="Simulated seconds after the join and the crash.",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Same seed, same numbers.")
@click.option(
    "--profile",
    type=click.Choice(list(PROFILES)),
    default="lan",
    show_default=True,
    help="SWIM parameters (memberlist's LAN or WAN defaults) and network latency.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0.0),
    default=None,
    help="One-way latency [profile: lan 0.25, wan 40].",
)
@click.option(
    "--jitter-ms",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Uniform +/- jitter on the latency [profile: lan 0.1, wan 10].",
)
@click.option(
    "--bootstrap",
    type=click.Choice(["baseline", "join"]),
    default="baseline",
    show_default=True,
    help="Start converged, or replay everyone joining through one seed (<= 1000 nodes).",
)
@click.option("--json", "json_only", is_flag=True, help="Print only the JSON line.")
def gossip_command(
    nodes: int,
    loss: float,
    duration: float,
    seed: int,
    profile: str,
    latency_ms: float | None,
    jitter_ms: float | None,
    bootstrap: str,
    json_only: bool,
) -> None:
    """Run SWIM for NODES nodes: one joins through a seed while another crashes.

    Reports the time until 99.99% of live nodes know of the join and of the death, detection
    latency, false suspicions and deaths, and messages and bytes per node per second.
    """
    import resource
    import time

    from infermesh.dev.sim.report import RunCost, format_table, report_dict, report_json
    from infermesh.dev.sim.runner import GossipSimSettings, run_gossip_sim

    try:
        settings = GossipSimSettings(
            nodes=nodes,
            duration_s=duration,
            seed=seed,
            loss=loss,
            profile=profile,
            latency_s=None if latency_ms is None else latency_ms / 1000,
            jitter_s=None if jitter_ms is None else jitter_ms / 1000,
            bootstrap=bootstrap,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    result = run_gossip_sim(settings)
    cost = RunCost(
        wall_s=time.perf_counter() - wall_start,
        cpu_s=time.process_time() - cpu_start,
        # Linux reports kilobytes: the peak of this whole process.
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    report = report_dict(result, cost)
    if not json_only:
        click.echo(format_table(report))
    click.echo(report_json(report))


sim_group.add_command(route_command)

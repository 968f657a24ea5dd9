"""The gossip simulation's report: one JSON-ready dict, and the table a person reads.

Formatting only. Everything but `run` (wall time, CPU time, peak memory of this process) is a
function of the settings and the seed, so a rerun prints the same numbers.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from infermesh.dev.sim.runner import GossipSimResult

__all__ = ["RunCost", "format_table", "report_dict", "report_json"]

# The goal: a join known cluster-wide in under this long at 1,000 nodes (LAN).
JOIN_GOAL_S = 5.0


@attrs.frozen
class RunCost:
    """What the simulation cost this process (not deterministic)."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def report_dict(result: GossipSimResult, cost: RunCost) -> dict[str, Any]:
    """The documented JSON report (docs/simulation.md lists every key)."""
    settings, traffic = result.settings, result.traffic
    node_seconds = settings.nodes * traffic.simulated_s
    config = result.config
    join, failure = result.join, result.failure
    return {
        "scenario": "gossip",
        "nodes": settings.nodes,
        "loss": settings.loss,
        "duration_s": settings.duration_s,
        "seed": settings.seed,
        "profile": settings.profile,
        "latency_ms": _round(result.network.latency_s * 1000),
        "jitter_ms": _round(result.network.jitter_s * 1000),
        "bootstrap": settings.bootstrap,
        "bootstrap_s": _round(result.bootstrap_s),
        "bootstrap_converged": result.bootstrap_converged,
        "swim": attrs.asdict(config),
        "join": {
            "node": join.node,
            "seed_node": join.seed_node,
            "at_s": _round(join.at_s),
            "observers": join.observers,
            "knowing": join.knowing,
            "known_99_99_s": _round(join.known_99_99_s),
            "known_all_s": _round(join.known_all_s),
        },
        "failure": {
            "node": failure.node,
            "at_s": _round(failure.at_s),
            "observers": failure.observers,
            "marked_dead": failure.marked_dead,
            "first_suspect_s": _round(failure.first_suspect_s),
            "dead_99_99_s": _round(failure.dead_99_99_s),
            "dead_all_s": _round(failure.dead_all_s),
            "detection_median_s": _round(failure.detection_median_s),
            "detection_p99_s": _round(failure.detection_p99_s),
        },
        "false_positives": attrs.asdict(result.false_positives),
        "traffic": {
            "simulated_s": _round(traffic.simulated_s),
            "messages": traffic.messages,
            "lost": traffic.lost,
            "messages_per_node_s": _round(traffic.messages / node_seconds),
            "bytes_per_node_s": _round(traffic.bytes / node_seconds, 1),
            "bytes_method": traffic.bytes_method,
            "by_type": traffic.by_type,
        },
        "run": {
            "wall_s": round(cost.wall_s, 2),
            "cpu_s": round(cost.cpu_s, 2),
            "peak_rss_mb": round(cost.peak_rss_mb, 1),
        },
    }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, separators=(",", ":"), sort_keys=False)


def _seconds(value: float | None) -> str:
    return "not within the run" if value is None else f"{value:.2f} s"


def format_table(report: dict[str, Any]) -> str:
    """A few aligned lines for a terminal."""
    join, failure = report["join"], report["failure"]
    false, traffic, run = report["false_positives"], report["traffic"], report["run"]
    title = (
        f"gossip simulation: {report['nodes']} nodes, profile {report['profile']}, "
        f"loss {report['loss']:.0%}, latency {report['latency_ms']} ms "
        f"+/- {report['jitter_ms']} ms, {report['duration_s']:g} s after the events, "
        f"seed {report['seed']}, bootstrap {report['bootstrap']}"
    )
    join_goal = ""
    if report["profile"] == "lan":
        known = join["known_99_99_s"]
        met = known is not None and known < JOIN_GOAL_S
        join_goal = f"  (goal < {JOIN_GOAL_S:g} s: {'met' if met else 'NOT met'})"
    rows = [
        ("join", f"{join['node']} through {join['seed_node']}"),
        ("  known by 99.99% of live nodes", _seconds(join["known_99_99_s"]) + join_goal),
        (
            "  known by all",
            f"{_seconds(join['known_all_s'])} ({join['knowing']}/{join['observers']})",
        ),
        ("failure", f"{failure['node']} crashed"),
        ("  first suspicion", _seconds(failure["first_suspect_s"])),
        ("  marked dead by 99.99%", _seconds(failure["dead_99_99_s"])),
        (
            "  detection median / p99",
            f"{_seconds(failure['detection_median_s'])} / {_seconds(failure['detection_p99_s'])}",
        ),
        ("  marked dead by", f"{failure['marked_dead']}/{failure['observers']}"),
        (
            "false suspicions",
            f"{false['suspicions']} suspicions of {false['suspected_members']} live members "
            f"({false['suspect_events']} node-level events)",
        ),
        (
            "false deaths",
            f"{false['dead_members']} live members ({false['dead_events']} node-level events)",
        ),
        (
            "traffic per node",
            f"{traffic['messages_per_node_s']:.2f} msg/s, {traffic['bytes_per_node_s']:.0f} B/s "
            f"({traffic['bytes_method']}); {traffic['lost']} of {traffic['messages']} lost",
        ),
        (
            "run",
            f"{run['wall_s']:.1f} s wall, {run['cpu_s']:.1f} s CPU, "
            f"peak RSS {run['peak_rss_mb']:.0f} MiB",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([title, *(f"{label:<{width}}  {value}" for label, value in rows)])

"""Turn the gossip benchmark's observations into its table and its one JSON line.

Pure functions over numbers and `Observation`s: no I/O except the strings they return.

Detection: for each kill, each surviving member's delay from the SIGKILL to the line where it
marks the victim failed (Serf) or dead (InferMesh). `median`, `p99`, `max` pool those delays
over all repeats; `all know` is the median over repeats of the delay of the last member to
notice (the time until every other member marks it failed). `first suspicion` is the median
over repeats of the delay to the first suspect line about the victim by anyone: detection is
that plus the suspicion timeout (Lifeguard: shorter with more independent confirmations) plus
the spread of the failed mark.

False positives: every membership line about a live member inside the loss window (the loss
itself plus a short settle afterwards, so suspicions that started under loss are counted).
`failed marks` counts observer-lines (one member marking another failed/dead), `episodes`
groups suspect/failed/refute lines about one member that are less than `EPISODE_GAP_S` apart,
which counts suspicions the same way for both systems whatever each one logs per observer.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from benchmarks.gossip.cluster import Observation

__all__ = [
    "EPISODE_GAP_S",
    "DetectionRun",
    "DetectionSummary",
    "FalsePositives",
    "SystemResult",
    "count_false_positives",
    "percentile",
    "render_goals",
    "render_json",
    "render_table",
    "summarize_detection",
]

EPISODE_GAP_S = 10.0
"""Suspicion lines about one member closer than this belong to one episode."""
SYSTEMS = ("serf", "infermesh")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between closest ranks; NaN when empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class DetectionRun:
    """One SIGKILL: who died, how many members should notice, and when each one did."""

    victim: str
    observers: int
    """Surviving members expected to mark the victim failed."""
    delays_s: Mapping[str, float]
    """Observer -> seconds from the SIGKILL to its failed/dead line (missing: never, in time)."""
    first_suspect_s: float = math.nan
    """Seconds from the SIGKILL to the first suspect line about the victim, by anyone."""

    @property
    def missing(self) -> int:
        return max(0, self.observers - len(self.delays_s))

    @property
    def all_know_s(self) -> float:
        """When the last observer noticed; NaN if some never did."""
        if self.missing or not self.delays_s:
            return math.nan
        return max(self.delays_s.values())


def detection_run(
    victim: str, observers: Iterable[str], killed_at: float, observations: Iterable[Observation]
) -> DetectionRun:
    """The first failed mark of `victim` by each observer after `killed_at`, and the first
    suspicion of it by anyone (the start of the suspicion that ends in the failed marks)."""
    expected = set(observers) - {victim}
    delays: dict[str, float] = {}
    suspicions: list[float] = []
    for obs in observations:
        if obs.member != victim or obs.observer not in expected or obs.at < killed_at:
            continue
        if obs.kind in ("suspect", "declared", "failed"):
            suspicions.append(obs.at - killed_at)
        if obs.kind == "failed" and obs.observer not in delays:
            delays[obs.observer] = obs.at - killed_at
    first_suspect = min(suspicions) if suspicions else math.nan
    return DetectionRun(
        victim=victim, observers=len(expected), delays_s=delays, first_suspect_s=first_suspect
    )


@dataclass(frozen=True, slots=True)
class DetectionSummary:
    runs: int
    delays: int
    """Observer delays pooled over the runs."""
    missing: int
    """Observers that never marked the victim failed before the deadline, over all runs."""
    median_s: float
    p99_s: float
    max_s: float
    all_know_median_s: float
    first_suspect_median_s: float
    """Median over runs of the delay from the SIGKILL to the first suspicion by anyone."""


def summarize_detection(runs: Sequence[DetectionRun]) -> DetectionSummary:
    pooled = [delay for run in runs for delay in run.delays_s.values()]
    all_know = [run.all_know_s for run in runs if not math.isnan(run.all_know_s)]
    first = [run.first_suspect_s for run in runs if not math.isnan(run.first_suspect_s)]
    return DetectionSummary(
        runs=len(runs),
        delays=len(pooled),
        missing=sum(run.missing for run in runs),
        median_s=percentile(pooled, 50),
        p99_s=percentile(pooled, 99),
        max_s=max(pooled) if pooled else math.nan,
        all_know_median_s=statistics.median(all_know)
        if len(all_know) == len(runs) and runs
        else math.nan,
        first_suspect_median_s=statistics.median(first) if first else math.nan,
    )


@dataclass(frozen=True, slots=True)
class FalsePositives:
    """Membership lines about live members during the loss window."""

    lossy: str
    loss: float
    duration_s: float
    window_s: float
    failed_marks: int
    """Observer-lines marking a live member failed/dead."""
    failed_members: int
    """Distinct live members marked failed/dead by anyone."""
    suspect_lines: int
    """Suspect lines (Serf: by the prober only; InferMesh: by every member that marks it)."""
    declared: int
    """Suspicion timers that ran out (a member declared another failed)."""
    refutations: int
    """Times a member refuted a suspicion or death about itself."""
    episodes: int
    """Suspicion episodes (see EPISODE_GAP_S)."""
    about_lossy: int
    """Of the episodes, those about the lossy member itself."""
    proxy: Mapping[str, float] = field(default_factory=dict)
    """The lossy proxy's counters (udp_in, udp_dropped, ...)."""
    extra: Mapping[str, float] = field(default_factory=dict)
    """System-specific counters (InferMesh metrics deltas), shown in the JSON line only."""


def count_false_positives(
    observations: Iterable[Observation],
    *,
    start: float,
    end: float,
    live: Iterable[str],
    lossy: str,
    loss: float,
    duration_s: float,
    proxy: Mapping[str, float] | None = None,
    extra: Mapping[str, float] | None = None,
    refutations: int | None = None,
) -> FalsePositives:
    """Count lines about members in `live` whose arrival lies in [start, end].

    `refutations` replaces the count of `refute` lines for a system that does not log them
    (InferMesh: its refutation counters).
    """
    members = set(live)
    inside = sorted(
        (obs for obs in observations if start <= obs.at <= end and obs.member in members),
        key=lambda obs: obs.at,
    )
    failed = [obs for obs in inside if obs.kind == "failed"]
    suspicious = [obs for obs in inside if obs.kind in ("suspect", "failed", "declared", "refute")]
    episodes: dict[str, int] = {}
    last_seen: dict[str, float] = {}
    for obs in suspicious:
        previous = last_seen.get(obs.member)
        if previous is None or obs.at - previous >= EPISODE_GAP_S:
            episodes[obs.member] = episodes.get(obs.member, 0) + 1
        last_seen[obs.member] = obs.at
    return FalsePositives(
        lossy=lossy,
        loss=loss,
        duration_s=duration_s,
        window_s=end - start,
        failed_marks=len(failed),
        failed_members=len({obs.member for obs in failed}),
        suspect_lines=sum(1 for obs in inside if obs.kind == "suspect"),
        declared=sum(1 for obs in inside if obs.kind == "declared"),
        refutations=refutations
        if refutations is not None
        else sum(1 for obs in inside if obs.kind == "refute"),
        episodes=sum(episodes.values()),
        about_lossy=episodes.get(lossy, 0),
        proxy=dict(proxy or {}),
        extra=dict(extra or {}),
    )


@dataclass(frozen=True, slots=True)
class SystemResult:
    """Everything measured for one system; `error` says why a part could not be measured."""

    system: str
    version: str
    members: int
    detection: Sequence[DetectionRun] = ()
    false_positives: FalsePositives | None = None
    error: str = ""
    settings: Mapping[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- rendering


def _fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def _rows(result: SystemResult | None) -> dict[str, str]:
    """The table's cells for one system (all '-' when it was not measured)."""
    if result is None:
        return {}
    cells: dict[str, str] = {}
    if result.detection:
        summary = summarize_detection(result.detection)
        cells.update(
            {
                "detection median s": _fmt(summary.median_s),
                "detection p99 s": _fmt(summary.p99_s),
                "detection max s": _fmt(summary.max_s),
                "all know (median) s": _fmt(summary.all_know_median_s),
                "first suspicion (median) s": _fmt(summary.first_suspect_median_s),
                "kills / observers": f"{summary.runs} / {summary.delays}",
                "observers that missed it": str(summary.missing),
            }
        )
    fp = result.false_positives
    if fp is not None:
        cells.update(
            {
                "false failed marks": str(fp.failed_marks),
                "false failed members": str(fp.failed_members),
                "suspicion episodes": str(fp.episodes),
                "  about the lossy member": str(fp.about_lossy),
                "suspect lines": str(fp.suspect_lines),
                "refutations": str(fp.refutations),
                "inbound udp dropped": (
                    f"{int(fp.proxy.get('udp_dropped', 0))} / {int(fp.proxy.get('udp_in', 0))}"
                ),
            }
        )
    return cells


ROW_ORDER = (
    "detection median s",
    "detection p99 s",
    "detection max s",
    "all know (median) s",
    "first suspicion (median) s",
    "kills / observers",
    "observers that missed it",
    "false failed marks",
    "false failed members",
    "suspicion episodes",
    "  about the lossy member",
    "suspect lines",
    "refutations",
    "inbound udp dropped",
)


def render_table(results: Mapping[str, SystemResult | None]) -> str:
    """Serf and InferMesh side by side, one figure per line."""
    cells = {system: _rows(results.get(system)) for system in SYSTEMS}
    header = f"{'':<26} {'serf':>14} {'infermesh':>14}"
    lines = [header, "-" * len(header)]
    for row in ROW_ORDER:
        if row == "false failed marks":
            lines.append("")
        lines.append(
            f"{row:<26} {cells['serf'].get(row, '-'):>14} {cells['infermesh'].get(row, '-'):>14}"
        )
    return "\n".join(lines)


def goals(results: Mapping[str, SystemResult | None]) -> dict[str, bool | None]:
    """The issue's goals; None where a side was not measured."""
    serf, mesh = results.get("serf"), results.get("infermesh")
    out: dict[str, bool | None] = {
        "detection_median_le_serf": None,
        "false_failed_le_serf": None,
        "suspicion_episodes_le_serf": None,
    }
    if serf is None or mesh is None:
        return out
    if serf.detection and mesh.detection:
        a = summarize_detection(mesh.detection).median_s
        b = summarize_detection(serf.detection).median_s
        if not (math.isnan(a) or math.isnan(b)):
            out["detection_median_le_serf"] = a <= b
    if serf.false_positives is not None and mesh.false_positives is not None:
        out["false_failed_le_serf"] = (
            mesh.false_positives.failed_marks <= serf.false_positives.failed_marks
        )
        out["suspicion_episodes_le_serf"] = (
            mesh.false_positives.episodes <= serf.false_positives.episodes
        )
    return out


def render_goals(results: Mapping[str, SystemResult | None]) -> str:
    words = {True: "met", False: "MISSED", None: "- (not measured on both)"}
    met = goals(results)
    return "\n".join(
        [
            "goals (InferMesh vs Serf, same members, same parameters):",
            f"  median detection no slower than Serf's    {words[met['detection_median_le_serf']]}",
            f"  no more false failed marks under loss      {words[met['false_failed_le_serf']]}",
            f"  no more suspicion episodes under loss      "
            f"{words[met['suspicion_episodes_le_serf']]}",
        ]
    )


def _num(value: float, digits: int = 3) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _system_json(result: SystemResult) -> dict[str, object]:
    out: dict[str, object] = {
        "version": result.version,
        "members": result.members,
        "settings": dict(result.settings),
        "error": result.error or None,
    }
    if result.detection:
        summary = summarize_detection(result.detection)
        out["detection"] = {
            "median_s": _num(summary.median_s),
            "p99_s": _num(summary.p99_s),
            "max_s": _num(summary.max_s),
            "all_know_median_s": _num(summary.all_know_median_s),
            "first_suspect_median_s": _num(summary.first_suspect_median_s),
            "delays": summary.delays,
            "missing": summary.missing,
            "runs": [
                {
                    "victim": run.victim,
                    "observers": run.observers,
                    "missing": run.missing,
                    "median_s": _num(percentile(list(run.delays_s.values()), 50)),
                    "all_know_s": _num(run.all_know_s),
                    "first_suspect_s": _num(run.first_suspect_s),
                }
                for run in result.detection
            ],
        }
    else:
        out["detection"] = None
    fp = result.false_positives
    out["false_positives"] = (
        None
        if fp is None
        else {
            "lossy_member": fp.lossy,
            "loss": fp.loss,
            "duration_s": fp.duration_s,
            "window_s": round(fp.window_s, 1),
            "failed_marks": fp.failed_marks,
            "failed_members": fp.failed_members,
            "episodes": fp.episodes,
            "episodes_about_lossy": fp.about_lossy,
            "suspect_lines": fp.suspect_lines,
            "declared": fp.declared,
            "refutations": fp.refutations,
            "proxy": dict(fp.proxy),
            "extra": dict(fp.extra),
        }
    )
    return out


def render_json(
    results: Mapping[str, SystemResult | None],
    *,
    settings: Mapping[str, object],
    skipped: Mapping[str, str],
) -> str:
    """The one machine-readable line; a system that did not run is `null`."""
    line: dict[str, object] = {"benchmark": "gossip_vs_serf", "settings": dict(settings)}
    for system in SYSTEMS:
        result = results.get(system)
        line[system] = None if result is None else _system_json(result)
    line["goals"] = goals(results)
    line["skipped"] = dict(skipped)
    return json.dumps(line, separators=(",", ":"), sort_keys=False)

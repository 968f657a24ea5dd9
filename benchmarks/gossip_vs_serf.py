"""Gossip failure detection: HashiCorp Serf vs InferMesh agents, real processes on loopback.

Runs the same two experiments for `serf agent` members and for `infermesh agent run` members
(gossip only), each with `--members` processes (default 16) and memberlist's LAN parameters on
both sides (probe 1 s, probe timeout 500 ms, suspicion multiplier 4, gossip 200 ms, retransmit
multiplier 4; AES-GCM encrypted gossip on both unless `--insecure`):

1. detection: on a converged fresh cluster, SIGKILL one member and time, per surviving member,
   the delay until it marks the victim failed; `--repeats` kills (default 3), a fresh cluster
   and a different victim each time;
2. false positives: with inbound UDP to one member dropped at `--loss` (default 10%) for
   `--loss-duration` seconds (default 60) by a lossy proxy in front of it (TCP intact), count
   suspicions and failed marks about members that are alive.

    uv run python benchmarks/gossip_vs_serf.py [--members 16] [--repeats 3] [--loss-duration 60]

Prints a side-by-side table and, as the last line, one JSON line. Without a `serf` executable
it says so and still measures InferMesh (`"serf": null`). Every process it starts listens on
127.0.0.1 and is stopped on exit. It never asserts timings. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import platform
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gossip.cluster import ClusterError, System
from benchmarks.gossip.infermesh import (
    InfermeshSystem,
    find_infermesh,
    infermesh_version,
)
from benchmarks.gossip.measure import Timing, detect, false_positives
from benchmarks.gossip.report import (
    DetectionRun,
    FalsePositives,
    SystemResult,
    render_goals,
    render_json,
    render_table,
)
from benchmarks.gossip.serf import SerfSystem, find_serf, serf_version

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEM_NAMES = ("serf", "infermesh")


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


def loss_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be within 0..1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--members", type=positive_int, default=16, help="processes per cluster")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="kills, each on a fresh cluster with another victim (0 skips the detection runs)",
    )
    parser.add_argument(
        "--loss", type=loss_fraction, default=0.10, help="inbound UDP drop fraction, lossy member"
    )
    parser.add_argument(
        "--loss-duration",
        type=float,
        default=60.0,
        help="seconds of loss in the false-positive run (0 skips that run)",
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after convergence before the fault"
    )
    parser.add_argument(
        "--loss-settle",
        type=float,
        default=5.0,
        help="seconds after the loss stops that still count",
    )
    parser.add_argument(
        "--detect-timeout",
        type=positive_float,
        default=60.0,
        help="seconds a survivor may take to mark the victim failed",
    )
    parser.add_argument(
        "--start-timeout",
        type=positive_float,
        default=120.0,
        help="seconds a cluster may take to start and converge",
    )
    parser.add_argument(
        "--skip", default="", metavar="SYSTEMS", help="comma list of systems to leave out"
    )
    parser.add_argument("--serf", default=None, metavar="PATH", help="serf executable")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gossip on both sides (default: AES-GCM)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the proxy's drop decisions")
    parser.add_argument(
        "--log-dir", default=None, help="keep the members' logs here (default: a temp directory)"
    )
    args = parser.parse_args(argv)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - set(SYSTEM_NAMES)
    if unknown:
        parser.error(f"--skip: unknown {', '.join(sorted(unknown))}; use {', '.join(SYSTEM_NAMES)}")
    args.skip = skip
    if args.members < 3:
        parser.error("--members must be >= 3 (a victim, and at least two members to notice)")
    if args.repeats < 0:
        parser.error("--repeats must be >= 0")
    if args.loss_duration < 0 or args.settle < 0 or args.loss_settle < 0:
        parser.error("--loss-duration, --settle and --loss-settle must be >= 0")
    return args


def victim_index(repeat: int, members: int) -> int:
    """A different member each repeat, never the seed (index 0) nor the lossy member (last)."""
    return 1 + (repeat * 5) % max(1, members - 2)


def build_systems(
    args: argparse.Namespace, work_dir: Path
) -> tuple[dict[str, System], dict[str, str], dict[str, str]]:
    """The systems to measure, their versions, and why any of them is skipped."""
    systems: dict[str, System] = {}
    versions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    if "serf" in args.skip:
        skipped["serf"] = "--skip"
    else:
        serf = find_serf(args.serf)
        if serf is None:
            skipped["serf"] = (
                f"serf executable not found ({args.serf or 'serf on PATH'}); "
                "install it (Debian: apt-get install serf) or pass --serf PATH"
            )
        else:
            systems["serf"] = SerfSystem(serf, encrypt_key="" if args.insecure else key)
            versions["serf"] = serf_version(serf)
    if "infermesh" in args.skip:
        skipped["infermesh"] = "--skip"
    else:
        prefix = find_infermesh()
        if prefix is None:
            skipped["infermesh"] = "the infermesh command is not installed in this environment"
        else:
            key_file = None
            if not args.insecure:
                key_file = work_dir / "gossip.key"
                key_file.write_text(key + "\n")
                key_file.chmod(0o600)
            systems["infermesh"] = InfermeshSystem(prefix, key_file)
            versions["infermesh"] = infermesh_version(REPO_ROOT)
    return systems, versions, skipped


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_all(
    systems: dict[str, System], args: argparse.Namespace, work_dir: Path
) -> tuple[dict[str, list[DetectionRun]], dict[str, FalsePositives], dict[str, str]]:
    """Both experiments for every system; the kills alternate systems repeat by repeat."""
    timing = Timing(
        start_timeout_s=args.start_timeout,
        settle_s=args.settle,
        detect_timeout_s=args.detect_timeout,
        loss_duration_s=args.loss_duration,
        loss_settle_s=args.loss_settle,
    )
    detections: dict[str, list[DetectionRun]] = {name: [] for name in systems}
    losses: dict[str, FalsePositives] = {}
    errors: dict[str, str] = {}
    for repeat in range(args.repeats):
        for name, system in systems.items():
            if name in errors:
                continue
            index = victim_index(repeat, args.members)
            try:
                run, formed_s = detect(system, args.members, index, work_dir, timing)
            except ClusterError as exc:
                errors[name] = str(exc)
                _log(f"  {name}: detection run failed: {exc}")
                continue
            delays = sorted(run.delays_s.values())
            median = delays[len(delays) // 2] if delays else float("nan")
            _log(
                f"  kill {repeat + 1}/{args.repeats} {name:<9} victim {run.victim}: "
                f"median {median:.2f} s, all know {run.all_know_s:.2f} s, "
                f"missed {run.missing} (cluster formed in {formed_s:.1f} s)"
            )
            detections[name].append(run)
    if args.loss_duration > 0:
        for name, system in systems.items():
            if name in errors:
                continue
            _log(f"  {name}: {args.loss:.0%} inbound loss for {args.loss_duration:g} s ...")
            try:
                fp = false_positives(
                    system,
                    args.members,
                    args.members - 1,
                    args.loss,
                    work_dir,
                    timing,
                    seed=args.seed,
                )
            except ClusterError as exc:
                errors[name] = str(exc)
                _log(f"  {name}: loss run failed: {exc}")
                continue
            _log(
                f"  {name}: failed marks {fp.failed_marks}, suspicion episodes {fp.episodes}, "
                f"dropped {int(fp.proxy.get('udp_dropped', 0))}/{int(fp.proxy.get('udp_in', 0))}"
            )
            losses[name] = fp
    return detections, losses, errors


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
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgossip-")))
        systems, versions, skipped = build_systems(args, work_dir)
        for name, reason in skipped.items():
            print(f"NOTE: {name} not measured: {reason}", file=sys.stderr)
        _log(f"measuring {', '.join(systems) or 'nothing'} with {args.members} members ...")
        try:
            detections, losses, errors = run_all(systems, args, work_dir)
        except KeyboardInterrupt:
            _log("interrupted; members stopped")
            return 130
    results: dict[str, SystemResult | None] = {}
    for name in SYSTEM_NAMES:
        if name not in systems:
            results[name] = None
            continue
        results[name] = SystemResult(
            system=name,
            version=versions.get(name, ""),
            members=args.members,
            detection=detections.get(name, []),
            false_positives=losses.get(name),
            error=errors.get(name, ""),
            settings={"profile": "lan", "encrypted": not args.insecure},
        )
    settings: dict[str, object] = {
        "members": args.members,
        "repeats": args.repeats,
        "loss": args.loss,
        "loss_duration_s": args.loss_duration,
        "loss_settle_s": args.loss_settle,
        "settle_s": args.settle,
        "profile": "lan",
        "encrypted": not args.insecure,
        "loss_injection": "lossy UDP proxy in front of one member (TCP intact)",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    for name, error in errors.items():
        print(f"WARNING: {name}: {error}", file=sys.stderr)
    print(render_table(results))
    notes = []
    if args.repeats:
        notes.append(
            f"detection: delay from SIGKILL to each survivor's failed/dead line, pooled over "
            f"{args.repeats} kills; all know: median over kills of the last survivor's delay."
        )
    if args.loss_duration:
        notes.append(
            f"false positives: lines about live members during {args.loss:.0%} inbound UDP loss "
            f"to one member for {args.loss_duration:g} s (+{args.loss_settle:g} s); Serf logs "
            f"suspect lines at the prober only, InferMesh at every member, so compare episodes."
        )
    print("\n" + "\n".join(notes))
    print(render_goals(results))
    print(render_json(results, settings=settings, skipped=skipped))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

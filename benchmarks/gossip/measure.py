"""The two experiments, run the same way for any `System`, each on a fresh cluster.

- `detect`: start N members, wait until every member sees every other alive, let it settle,
  SIGKILL one, and record when each survivor marks it failed.
- `false_positives`: start N members with a lossy proxy in front of one of them (loss off),
  wait for convergence, turn inbound UDP loss on for a while, then off, and count the membership
  lines about live members in that window.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from benchmarks.gossip.cluster import (
    LOOPBACK,
    Cluster,
    ClusterError,
    MemberPlan,
    System,
    free_port,
)
from benchmarks.gossip.report import (
    DetectionRun,
    FalsePositives,
    count_false_positives,
    detection_run,
)

__all__ = [
    "ProxyChild",
    "StartFailed",
    "Timing",
    "detect",
    "false_positives",
    "member_name",
    "plan_members",
]

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Timing:
    """Deadlines and measured periods shared by both systems."""

    start_timeout_s: float = 90.0
    """From the first member's start until every member sees every other alive."""
    settle_s: float = 3.0
    """Quiet time after convergence, before the kill or the loss."""
    detect_timeout_s: float = 60.0
    """How long after the kill a survivor may take to mark the victim failed."""
    loss_duration_s: float = 60.0
    loss_settle_s: float = 5.0
    """Window after the loss stops that still counts (suspicions started under loss)."""


class CounterSource(Protocol):
    """A system that can also report its own counters (InferMesh's /metrics)."""

    def counters(self, plans: list[MemberPlan]) -> dict[str, float]: ...


def member_name(index: int) -> str:
    return f"n{index:02d}"


def plan_members(
    count: int, work_dir: Path, *, proxied: Mapping[int, int] | None = None
) -> list[MemberPlan]:
    """`count` members on free loopback ports, all joining through the first one.

    `proxied` maps a member index to the port of a proxy it advertises instead of its bind.
    """
    proxied = proxied or {}
    plans: list[MemberPlan] = []
    seed = ""
    for index in range(count):
        name = member_name(index)
        bind = (LOOPBACK, free_port())
        advertise = (LOOPBACK, proxied[index]) if index in proxied else bind
        member_dir = work_dir / name
        member_dir.mkdir(parents=True, exist_ok=True)
        plans.append(
            MemberPlan(
                name=name,
                index=index,
                bind=bind,
                advertise=advertise,
                seeds=(seed,) if seed else (),
                work_dir=member_dir,
            )
        )
        if not seed:
            seed = f"{advertise[0]}:{advertise[1]}"
    return plans


def _wait_tcp(cluster: Cluster, address: tuple[str, int], timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        cluster.check_running()
        try:
            with socket.create_connection(address, timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{cluster.system.name}: nothing listens on {address[0]}:{address[1]} "
                    f"after {timeout_s:.0f} s"
                ) from None
        cluster.pump(0.1)


class StartFailed(ClusterError):
    """The cluster did not form (a member could not bind its port, say): worth another try."""


START_ATTEMPTS = 3


def start_cluster(cluster: Cluster, plans: list[MemberPlan], timing: Timing) -> float:
    """Start the seed, then the others; wait for convergence. Returns seconds it took."""
    started = time.monotonic()
    try:
        cluster.start(plans[0])
        _wait_tcp(cluster, plans[0].bind, timing.start_timeout_s)
        for plan in plans[1:]:
            cluster.start(plan)
        left = timing.start_timeout_s - (time.monotonic() - started)
        cluster.wait_for(cluster.converged, max(left, 1.0), f"convergence of {len(plans)} members")
    except ClusterError as exc:
        raise StartFailed(str(exc)) from exc
    return time.monotonic() - started


def _retrying(base_dir: Path, run: Callable[[Path], T]) -> T:
    """`run(run_dir)` on fresh ports until its cluster forms, at most START_ATTEMPTS times.

    Ports are picked free but another program (or an outgoing connection's ephemeral port) can
    take one before a member binds it; that only costs a new cluster, not the measurement.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        run_dir = base_dir if attempt == 1 else base_dir.with_name(f"{base_dir.name}-{attempt}")
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            return run(run_dir)
        except StartFailed as exc:
            if attempt == START_ATTEMPTS:
                raise
            first_line = str(exc).splitlines()[0]
            print(f"  cluster did not form ({first_line}); again on fresh ports", file=sys.stderr)
    raise AssertionError("unreachable")


def detect(
    system: System, members: int, victim_index: int, work_dir: Path, timing: Timing
) -> tuple[DetectionRun, float]:
    """One kill on a fresh cluster; returns the run and the seconds the cluster took to form."""

    def once(run_dir: Path) -> tuple[DetectionRun, float]:
        plans = plan_members(members, run_dir)
        with Cluster(system, run_dir) as cluster:
            formed_s = start_cluster(cluster, plans, timing)
            cluster.idle(timing.settle_s)
            victim = plans[victim_index].name
            killed_at = cluster.kill(victim)
            observers = cluster.live()

            def everyone_knows() -> bool:
                run = detection_run(victim, observers, killed_at, cluster.observations)
                return run.missing == 0

            with contextlib.suppress(ClusterError):  # reported as observers that missed it
                cluster.wait_for(everyone_knows, timing.detect_timeout_s, f"detection of {victim}")
            return detection_run(victim, observers, killed_at, cluster.observations), formed_s

    return _retrying(work_dir / f"{system.name}-detect-{victim_index}", once)


class ProxyChild:
    """`benchmarks.gossip.proxy` as a child process, steered over its stdin."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], seed: int) -> None:
        self.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.gossip.proxy",
                f"--listen={listen[0]}:{listen[1]}",
                f"--target={target[0]}:{target[1]}",
                f"--seed={seed}",
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        ready = self._read(10.0)
        if not ready.get("ready"):
            self.close()
            raise ClusterError(f"lossy proxy did not start: {ready}")

    def _read(self, timeout_s: float) -> dict[str, object]:
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], timeout_s)
        if not ready:
            raise ClusterError("lossy proxy did not answer in time")
        line = self.popen.stdout.readline()
        if not line:
            raise ClusterError(f"lossy proxy exited with status {self.popen.wait()}")
        answer: dict[str, object] = json.loads(line)
        return answer

    def command(self, text: str) -> dict[str, object]:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()
        answer = self._read(10.0)
        if "error" in answer:
            raise ClusterError(f"lossy proxy: {answer['error']}")
        return answer

    def set_loss(self, loss: float) -> None:
        self.command(f"loss {loss}")

    def stats(self) -> dict[str, float]:
        return {key: float(value) for key, value in self.command("stats").items()}  # type: ignore[arg-type]

    def close(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)

    def __enter__(self) -> ProxyChild:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def false_positives(
    system: System,
    members: int,
    lossy_index: int,
    loss: float,
    work_dir: Path,
    timing: Timing,
    *,
    seed: int = 1,
) -> FalsePositives:
    """One loss period on a fresh cluster, with the lossy member behind a proxy."""

    def once(run_dir: Path) -> FalsePositives:
        proxy_port = free_port()
        plans = plan_members(members, run_dir, proxied={lossy_index: proxy_port})
        lossy = plans[lossy_index]
        try:
            proxy = ProxyChild((LOOPBACK, proxy_port), lossy.bind, seed)
        except ClusterError as exc:
            raise StartFailed(str(exc)) from exc
        with proxy, Cluster(system, run_dir) as cluster:
            start_cluster(cluster, plans, timing)
            cluster.idle(timing.settle_s)
            counters_before = _counters(system, plans)
            proxy.set_loss(loss)
            start = time.monotonic()
            cluster.idle(timing.loss_duration_s)
            proxy.set_loss(0.0)
            cluster.idle(timing.loss_settle_s)
            end = time.monotonic()
            cluster.check_running()
            counters_after = _counters(system, plans)
            extra = {
                key: counters_after[key] - counters_before.get(key, 0.0) for key in counters_after
            }
            stats = proxy.stats()
            refuted = extra.get("infermesh_gossip_refutations_total")
            return count_false_positives(
                cluster.observations,
                start=start,
                end=end,
                live=cluster.live(),
                lossy=lossy.name,
                loss=loss,
                duration_s=timing.loss_duration_s,
                proxy={k: v for k, v in stats.items() if k != "loss"},
                extra=extra,
                refutations=None if refuted is None else int(refuted),
            )

    return _retrying(work_dir / f"{system.name}-loss", once)


def _counters(system: System, plans: list[MemberPlan]) -> dict[str, float]:
    source = getattr(system, "counters", None)
    if source is None:
        return {}
    counters: dict[str, float] = source(plans)
    return counters

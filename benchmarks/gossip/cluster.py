"""A cluster of gossip member processes on loopback whose log lines are timestamped on arrival.

The two systems differ only in a `System` (how to start a member, how to read its log lines);
everything else is shared: ports, process start and SIGKILL, a reader thread per member that
stamps each line with `time.monotonic()` the moment it arrives (finer than log timestamps and
on one clock for all members), and each observer's view of the membership built from those
lines. Nothing here sleeps as synchronisation: `wait_for` pumps lines until a condition holds or
a deadline passes.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol

__all__ = [
    "KINDS",
    "Cluster",
    "ClusterError",
    "Command",
    "Kind",
    "MemberPlan",
    "Observation",
    "System",
    "free_port",
]

Kind = Literal["alive", "suspect", "failed", "left", "refute", "declared"]
"""What one member's log line says about a member:

- `alive`: the observer knows the member as alive (joined, or back after a suspicion);
- `suspect`: the observer marked the member suspect;
- `failed`: the observer marked the member failed (Serf) / dead (InferMesh);
- `left`: the member left gracefully;
- `refute`: the observer (the member itself) refuted a suspicion or death about itself;
- `declared`: the observer's own suspicion timer ran out and it declared the member failed.
"""
KINDS: tuple[Kind, ...] = ("alive", "suspect", "failed", "left", "refute", "declared")
LOOPBACK = "127.0.0.1"


class ClusterError(RuntimeError):
    """A member could not start or the cluster did not reach a state in time."""


@dataclass(frozen=True, slots=True)
class Observation:
    """One membership log line: `observer` says `member` is now `kind`, seen at `at` (monotonic)."""

    observer: str
    kind: Kind
    member: str
    at: float


@dataclass(frozen=True, slots=True)
class MemberPlan:
    """Where one member listens and whom it joins."""

    name: str
    index: int
    bind: tuple[str, int]
    """The member's real UDP + TCP gossip port."""
    advertise: tuple[str, int]
    """The address others use: `bind`, or a lossy proxy in front of it."""
    seeds: tuple[str, ...]
    """`host:port` of members to join through (empty for the first member)."""
    work_dir: Path


@dataclass(frozen=True, slots=True)
class Command:
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


class System(Protocol):
    """One gossip implementation: how to start a member and how to read what it logs."""

    name: str

    def command(self, plan: MemberPlan) -> Command:
        """The command that runs `plan`'s member in the foreground, logging to stdout/stderr."""
        ...

    def parse(self, line: str) -> tuple[Kind, str] | None:
        """(kind, member) when `line` is a membership line, else None."""
        ...


_GIVEN_PORTS: set[int] = set()


def free_port(host: str = LOOPBACK) -> int:
    """A port free for both TCP and UDP a moment ago (gossip uses both on one port), never one
    this process handed out before. Another program may still take it before the member binds
    it: `measure` starts a cluster again on fresh ports when a member cannot bind."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            if port in _GIVEN_PORTS:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                _GIVEN_PORTS.add(port)
                return port
    raise ClusterError("no port free for both TCP and UDP after 100 tries")


@dataclass
class _Member:
    plan: MemberPlan
    popen: subprocess.Popen[bytes]
    log_path: Path
    reader: threading.Thread
    killed_at: float | None = None

    def log_tail(self, max_bytes: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"(no log: {exc})"
        return data[-max_bytes:].decode(errors="replace")


def _read_lines(
    name: str, stream: IO[bytes], log_path: Path, sink: queue.Queue[tuple[str, float, str]]
) -> None:
    """Reader thread: stamp each line on arrival, copy it to the member's log file."""
    with log_path.open("ab") as log:
        for raw in iter(stream.readline, b""):
            at = time.monotonic()
            log.write(raw)
            sink.put((name, at, raw.decode(errors="replace").rstrip("\n")))
        log.flush()


class Cluster:
    """Member processes of one system; a context manager that always stops them all."""

    def __init__(self, system: System, work_dir: Path) -> None:
        self.system = system
        self.work_dir = work_dir
        self.members: dict[str, _Member] = {}
        self.observations: list[Observation] = []
        self.views: dict[str, dict[str, Kind]] = {}
        """observer -> member -> latest kind (of alive/suspect/failed/left) it logged."""
        self._lines: queue.Queue[tuple[str, float, str]] = queue.Queue()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    # ----------------------------------------------------------------- processes

    def start(self, plan: MemberPlan) -> None:
        """Start one member (its output read by a thread from now on)."""
        command = self.system.command(plan)
        # No INFERMESH_* from the caller's environment: each member runs its own config only.
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}
        env.update(command.env)
        log_path = self.work_dir / f"{self.system.name}-{plan.name}.log"
        popen = subprocess.Popen(
            list(command.argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=plan.work_dir,
            start_new_session=True,
        )
        assert popen.stdout is not None
        reader = threading.Thread(
            target=_read_lines,
            args=(plan.name, popen.stdout, log_path, self._lines),
            name=f"log-{plan.name}",
            daemon=True,
        )
        reader.start()
        self.members[plan.name] = _Member(plan, popen, log_path, reader)
        self.views.setdefault(plan.name, {})

    def kill(self, name: str) -> float:
        """SIGKILL one member; returns the monotonic time just before the signal."""
        member = self.members[name]
        at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(member.popen.pid, signal.SIGKILL)
        member.killed_at = at
        member.popen.wait(timeout=10)
        return at

    def live(self) -> list[str]:
        """Names of members not killed by the benchmark, in start order."""
        return [name for name, member in self.members.items() if member.killed_at is None]

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every member, then SIGKILL what is left; waits for all of them."""
        for member in self.members.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(member.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for member in self.members.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for member in self.members.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(member.popen.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                member.popen.wait(timeout=grace_s)
            member.reader.join(timeout=grace_s)

    def check_running(self) -> None:
        """Raise ClusterError naming a member that exited on its own, with its log tail."""
        for member in self.members.values():
            code = member.popen.poll()
            if code is not None and member.killed_at is None:
                raise ClusterError(
                    f"{self.system.name} member {member.plan.name} exited with status {code}\n"
                    f"--- {member.log_path} ---\n{member.log_tail()}"
                )

    def log_tail(self, name: str) -> str:
        return self.members[name].log_tail()

    # ----------------------------------------------------------------- observations

    def pump(self, timeout_s: float = 0.0) -> list[Observation]:
        """Take the lines that arrived (waiting up to `timeout_s` for the first); parse them."""
        new: list[Observation] = []
        try:
            item = self._lines.get(timeout=timeout_s) if timeout_s > 0 else self._lines.get_nowait()
        except queue.Empty:
            return new
        while True:
            name, at, line = item
            parsed = self.system.parse(line)
            if parsed is not None:
                kind, member = parsed
                if kind == "refute" and not member:
                    member = name  # a member refutes suspicions about itself
                observation = Observation(name, kind, member, at)
                new.append(observation)
                self.observations.append(observation)
                if kind in ("alive", "suspect", "failed", "left"):
                    self.views.setdefault(name, {})[member] = kind
            try:
                item = self._lines.get_nowait()
            except queue.Empty:
                return new

    def wait_for(self, condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Pump lines until `condition()` holds; ClusterError naming `what` after the deadline."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.check_running()
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(f"{self.system.name}: {what} not reached in {timeout_s:.0f} s")
            self.pump(min(left, 0.05))

    def idle(self, seconds: float) -> None:
        """Keep reading lines for `seconds` (a measured period, not a synchronisation)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.pump(min(left, 0.05))

    def sees_all_alive(self, observers: Iterable[str], members: Sequence[str]) -> bool:
        """Every observer's view has every other member alive."""
        for observer in observers:
            view = self.views.get(observer, {})
            if any(view.get(member) != "alive" for member in members if member != observer):
                return False
        return True

    def converged(self) -> bool:
        live = self.live()
        return self.sees_all_alive(live, live)

"""Start the benchmark's servers as child processes and make sure every one of them ends.

Each child runs in its own session (process group) with its output in a log file; `stop_all`
sends SIGTERM to every group, waits, then SIGKILLs what is left. Never used for anything but
loopback servers the benchmark itself started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ChildProcess", "ProcessGroup", "StartError", "cpu_seconds_by_group", "free_port"]

_CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class StartError(RuntimeError):
    """A child did not become ready; the message names it and quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def cpu_seconds_by_group() -> dict[int, float]:
    """User + system CPU seconds of every live process, summed by process group (Linux /proc).

    Empty where /proc is not available: CPU figures are then reported as unknown.
    """
    totals: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return totals
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # the process ended while we looked
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        pgrp, utime, stime = int(fields[2]), int(fields[11]), int(fields[12])
        totals[pgrp] = totals.get(pgrp, 0.0) + (utime + stime) / _CLOCK_TICKS_S
    return totals


@dataclass
class ChildProcess:
    name: str
    argv: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, max_bytes: int = 3000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as exc:
            return f"(no log: {exc})"
        return data[-max_bytes:].decode(errors="replace")


class ProcessGroup:
    """The children of one benchmark run; use as a context manager so they always stop."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[ChildProcess] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ChildProcess:
        log_path = self.log_dir / f"{name}.log"
        child_env = dict(os.environ)
        child_env.update(env or {})
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd,
                start_new_session=True,
            )
        child = ChildProcess(name, tuple(argv), popen, log_path)
        self.children.append(child)
        return child

    def stop(self, child: ChildProcess, grace_s: float = 5.0) -> None:
        self._signal(child, signal.SIGTERM)
        try:
            child.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self._signal(child, signal.SIGKILL)
            child.popen.wait(timeout=grace_s)
        # Children of the child (uv run -> python) share its process group.
        self._signal(child, signal.SIGKILL)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self, grace_s: float = 5.0) -> None:
        for child in reversed(self.children):
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        for child in self.children:
            self._signal(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=grace_s)
        self.children.clear()

    @staticmethod
    def _signal(child: ChildProcess, signum: signal.Signals) -> None:
        # The child leads its own session, so its pid is its process-group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.popen.pid, signum)

    def wait_http(
        self,
        child: ChildProcess,
        url: str,
        *,
        timeout_s: float = 60.0,
        expect: bytes | None = None,
    ) -> None:
        """Poll `url` until it answers 200 (and contains `expect`, if given), or raise."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = child.popen.poll()
            if code is not None:
                raise StartError(
                    f"{child.name} exited with status {code} before {url} was ready.\n"
                    f"command: {' '.join(child.argv)}\n--- {child.log_path} ---\n"
                    f"{child.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    body = response.read()
                    if response.status == 200 and (expect is None or expect in body):
                        return
                    last = f"HTTP {response.status}: {body[:200]!r}"
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise StartError(
            f"{child.name} not ready after {timeout_s:.0f} s at {url} (last: {last}).\n"
            f"command: {' '.join(child.argv)}\n--- {child.log_path} ---\n{child.log_tail()}"
        )

"""Find (or install into `.bench/`) the third-party programs the benchmark compares against.

`vllm-router` goes into its own virtual environment under `.bench/vllm-router` so it never
changes the workspace `.venv`. granian and httpx for the ingress/upstream variants are layered
on the workspace environment with `uv run --with` (uv caches them; `.venv` is untouched).
Every function returns None plus a reason instead of raising, so the benchmark can still report
the modes that do not need the missing tool.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Found",
    "find_uv",
    "find_vllm_router",
    "package_versions",
    "variant_python",
    "vllm_router_version",
]

VLLM_ROUTER_PACKAGE = "vllm-router"


@dataclass(frozen=True, slots=True)
class Found:
    """A located tool: the argv prefix that runs it, or why it could not be found."""

    argv: tuple[str, ...] | None
    detail: str


def find_uv() -> str | None:
    return os.environ.get("UV") or shutil.which("uv")


def _run_quiet(argv: Sequence[str], timeout_s: float) -> tuple[bool, str]:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{' '.join(argv)}: {exc}"
    output = (done.stdout + done.stderr).strip()
    return done.returncode == 0, output[-1500:]


def package_versions(python: Sequence[str], packages: Sequence[str]) -> str:
    """`name version, ...` of `packages` as seen by the Python command `python` ("" if unknown)."""
    script = (
        "import importlib.metadata as m, sys\n"
        "for n in sys.argv[1:]:\n"
        "    try: print(n, m.version(n))\n"
        "    except m.PackageNotFoundError: pass\n"
    )
    ok, output = _run_quiet([*python, "-c", script, *packages], timeout_s=60.0)
    return ", ".join(output.splitlines()) if ok else ""


def vllm_router_version(program: str) -> str:
    """The vllm-router package version, asked of the Python beside the executable."""
    python = Path(program).parent / "python"
    return package_versions([str(python)], ["vllm-router"]) if python.is_file() else ""


def find_vllm_router(bench_dir: Path, explicit: str | None, install: bool) -> Found:
    """`vllm-router`: an explicit path, else beside this Python, else on PATH, else `.bench/`."""
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return Found((str(path),), f"{path} (--vllm-router)")
        return Found(None, f"--vllm-router {explicit} is not an executable file")
    beside = Path(sys.executable).parent / "vllm-router"
    if beside.is_file():
        return Found((str(beside),), f"{beside} (current environment)")
    on_path = shutil.which("vllm-router")
    if on_path:
        return Found((on_path,), f"{on_path} (PATH)")
    venv = bench_dir / "vllm-router"
    program = venv / "bin" / "vllm-router"
    if program.is_file():
        return Found((str(program),), f"{program} (bench venv)")
    if not install:
        return Found(None, "vllm-router not found and --no-install was given")
    uv = find_uv()
    steps: list[list[str]]
    if uv:
        steps = [
            [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                str(venv / "bin" / "python"),
                VLLM_ROUTER_PACKAGE,
            ],
        ]
    else:
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                VLLM_ROUTER_PACKAGE,
            ],
        ]
    print(f"installing {VLLM_ROUTER_PACKAGE} into {venv} (once) ...", file=sys.stderr)
    for step in steps:
        ok, output = _run_quiet(step, timeout_s=600.0)
        if not ok:
            return Found(None, f"could not install {VLLM_ROUTER_PACKAGE}: {output}")
    if program.is_file():
        return Found((str(program),), f"{program} (installed now)")
    return Found(None, f"{VLLM_ROUTER_PACKAGE} installed but {program} is missing")


def variant_python(repo_root: Path, install: bool, needs: Sequence[str]) -> Found:
    """A Python command that can import the workspace plus `needs` (granian, httpx)."""
    check = "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]"
    ok, _ = _run_quiet([sys.executable, "-c", check, *needs], timeout_s=60.0)
    if ok:
        return Found((sys.executable,), f"{sys.executable} (current environment)")
    uv = find_uv()
    if not uv:
        return Found(None, f"{', '.join(needs)} not importable and uv is not on PATH")
    if not install:
        return Found(None, f"{', '.join(needs)} not importable and --no-install was given")
    argv = [uv, "run", "--project", str(repo_root), "--no-sync", "--quiet"]
    for package in needs:
        argv += ["--with", package]
    argv.append("python")
    ok, output = _run_quiet([*argv, "-c", check, *needs], timeout_s=600.0)
    if ok:
        return Found(tuple(argv), f"uv run --with {' --with '.join(needs)}")
    return Found(None, f"could not provide {', '.join(needs)} with uv run --with: {output}")

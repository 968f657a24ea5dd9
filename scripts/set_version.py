"""Move every InferMesh distribution to one version, and the pins between them with it.

The workspace root's `[project] version` is the release version; every `packages/*/pyproject.toml`
carries the same number statically (so each sdist stands alone) and pins the other InferMesh
distributions it needs to exactly that number (`infermesh-core==0.1.0`). This script is the one
way to change it; `tests/workspace/test_versions.py` fails when any of them disagree.

    uv run python scripts/set_version.py            # print the version; exit 1 if they disagree
    uv run python scripts/set_version.py 0.2.0      # move everything to 0.2.0, then `uv lock`
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
# `version = "..."` at the start of a line: only `[project]` has one in our pyproject files.
VERSION_LINE = re.compile(r'^version = "([^"]*)"$', re.MULTILINE)
# A quoted requirement on one of ours in an array, with or without a pin: "infermesh-core==0.1.0"
# (never `name = "infermesh-core"`, which follows "= ").
OUR_NAMES = r"infermesh-(?:core|agent|router|vllm|triton|dcgm|dev)"
OUR_PIN = re.compile(rf'(?<!= )"({OUR_NAMES})(?:==[^";\s]*)?(?=[";\s])')


def pyprojects(root: Path) -> list[Path]:
    """The workspace root's pyproject first, then every distribution's, sorted."""
    members = sorted(root.glob("packages/*/pyproject.toml"))
    if not members:
        raise SystemExit(f"set_version: no packages/*/pyproject.toml under {root}")
    return [root / "pyproject.toml", *members]


def project_version(path: Path) -> str:
    return str(tomllib.loads(path.read_text())["project"]["version"])


def our_requirements(path: Path) -> list[str]:
    """Requirements on InferMesh distributions, from dependencies and every extra."""
    project = tomllib.loads(path.read_text())["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return [r for r in reqs if re.match(rf"{OUR_NAMES}(?![\w-])", r)]


def disagreements(root: Path) -> list[str]:
    """Every place whose version or pin differs from the root's version, as readable lines."""
    files = pyprojects(root)
    expected = project_version(files[0])
    problems: list[str] = []
    for path in files:
        where = path.relative_to(root)
        if (found := project_version(path)) != expected:
            problems.append(f"{where}: version {found}, expected {expected}")
        if path == files[0]:
            continue  # the unpublished workspace root takes its members from the workspace
        for req in our_requirements(path):
            name = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
            if req != f"{name}=={expected}":
                problems.append(f"{where}: requirement {req!r}, expected '{name}=={expected}'")
    return problems


def checked_version(text: str) -> str:
    """A PEP 440 version in its canonical spelling, or exit with what is wrong."""
    try:
        version = Version(text)
    except InvalidVersion:
        raise SystemExit(
            f"set_version: {text!r} is not a PEP 440 version (e.g. 0.2.0, 0.2.0rc1)"
        ) from None
    if str(version) != text:
        raise SystemExit(f"set_version: write {text!r} as {str(version)!r} (its canonical form)")
    return text


def rewrite(path: Path, version: str, *, pins: bool) -> None:
    before = path.read_text()
    text, count = VERSION_LINE.subn(f'version = "{version}"', before)
    if count != 1:
        raise SystemExit(f"set_version: {path}: expected one 'version = ...' line, found {count}")
    if pins:
        text = OUR_PIN.sub(lambda m: f'"{m.group(1)}=={version}', text)
    if tomllib.loads(text)["project"]["name"] != tomllib.loads(before)["project"]["name"]:
        raise SystemExit(f"set_version: {path}: the rewrite would change the project's name")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", help="new version, e.g. 0.2.0; omit to print")
    parser.add_argument("--root", type=Path, default=ROOT, help="workspace root (default: repo)")
    parser.add_argument("--no-lock", action="store_true", help="do not run `uv lock` afterwards")
    args = parser.parse_args(argv)
    root: Path = args.root.resolve()
    if args.version is None:
        problems = disagreements(root)
        print(project_version(root / "pyproject.toml"))
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    version = checked_version(args.version)
    files = pyprojects(root)
    for path in files:
        rewrite(path, version, pins=path != files[0])
    if problems := disagreements(root):
        raise SystemExit(
            "set_version: still disagreeing after the rewrite:\n" + "\n".join(problems)
        )
    print(f"set_version: {len(files)} pyproject.toml files at {version}")
    if not args.no_lock:
        subprocess.run(["uv", "lock"], cwd=root, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Versions move together: every distribution carries the workspace's version and pins the other
InferMesh distributions to exactly it, and `scripts/set_version.py` is the one way to move them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "set_version.py"
OURS = {p.parent.name for p in ROOT.glob("packages/*/pyproject.toml")}


def set_version(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def project(path: Path) -> dict[str, object]:
    table: dict[str, object] = tomllib.loads(path.read_text())["project"]
    return table


def copy_of_workspace(tmp_path: Path) -> Path:
    """The root pyproject and every distribution's pyproject, nothing else."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for pyproject in ROOT.glob("packages/*/pyproject.toml"):
        target = tmp_path / "packages" / pyproject.parent.name
        target.mkdir(parents=True)
        shutil.copy(pyproject, target / "pyproject.toml")
    return tmp_path


def test_every_distribution_has_the_workspace_version_and_pins_ours_to_it() -> None:
    result = set_version()
    version = str(project(ROOT / "pyproject.toml")["version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == version
    for name in OURS:
        meta = project(ROOT / "packages" / name / "pyproject.toml")
        assert meta["version"] == version, name
        deps = meta["dependencies"]
        assert isinstance(deps, list)
        for req in deps:
            dependency = re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0]
            if dependency in OURS:
                assert req == f"{dependency}=={version}", f"{name}: {req} not pinned"


def test_set_version_moves_every_distribution_and_every_pin(tmp_path: Path) -> None:
    root = copy_of_workspace(tmp_path)

    result = set_version("--root", root, "--no-lock", "0.2.0rc1")

    assert result.returncode == 0, result.stderr
    assert project(root / "pyproject.toml")["version"] == "0.2.0rc1"
    dev = project(root / "packages" / "infermesh-dev" / "pyproject.toml")
    assert dev["name"] == "infermesh-dev"
    assert dev["version"] == "0.2.0rc1"
    assert "infermesh-agent==0.2.0rc1" in dev["dependencies"]  # type: ignore[operator]
    assert set_version("--root", root).stdout.strip() == "0.2.0rc1"


def test_set_version_refuses_a_version_that_is_not_pep_440(tmp_path: Path) -> None:
    root = copy_of_workspace(tmp_path)
    before = (root / "packages" / "infermesh-core" / "pyproject.toml").read_text()

    bad = set_version("--root", root, "--no-lock", "next")
    non_canonical = set_version("--root", root, "--no-lock", "v0.2.0")

    assert bad.returncode != 0
    assert "'next' is not a PEP 440 version" in bad.stderr
    assert non_canonical.returncode != 0
    assert "write 'v0.2.0' as '0.2.0'" in non_canonical.stderr
    assert (root / "packages" / "infermesh-core" / "pyproject.toml").read_text() == before


def test_a_loose_pin_between_our_distributions_is_reported(tmp_path: Path) -> None:
    root = copy_of_workspace(tmp_path)
    vllm = root / "packages" / "infermesh-vllm" / "pyproject.toml"
    vllm.write_text(vllm.read_text().replace('"infermesh-core==', '"infermesh-core>=', 1))

    result = set_version("--root", root)

    assert result.returncode == 1
    assert "packages/infermesh-vllm/pyproject.toml: requirement 'infermesh-core>=" in result.stderr

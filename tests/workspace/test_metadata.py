"""Every distribution's metadata is fit to publish: a README that says what the package is and how
to install it, the Apache-2.0 licence with its text, classifiers, keywords and Python version —
checked from the pyproject files, without building (tests/workspace/test_packaging.py builds)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml"))


def project(package: Path) -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    return table


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_distribution_metadata_is_fit_to_publish(package: Path) -> None:
    meta = project(package)
    readme = package / meta["readme"]

    assert meta["name"] == package.name
    assert readme.is_file()
    text = readme.read_text()
    assert text.startswith(f"# {package.name}\n")
    assert re.search(rf"pip install [^\n]*{package.name}\b", text), "README shows no install line"
    assert meta["description"]
    assert meta["license"] == "Apache-2.0"
    assert meta["license-files"] == ["LICENSE"]
    assert (package / "LICENSE").read_bytes() == (ROOT / "LICENSE").read_bytes()
    assert meta["requires-python"] == ">=3.11"
    assert meta["keywords"]
    assert "Typing :: Typed" in meta["classifiers"]
    assert "Programming Language :: Python :: 3.11" in meta["classifiers"]
    assert not [c for c in meta["classifiers"] if c.startswith("License ::")], (
        "PEP 639: the licence expression replaces licence classifiers"
    )
    module = package.name.removeprefix("infermesh-")
    assert (package / "src" / "infermesh" / module / "py.typed").is_file()
    assert "infermesh" in meta["entry-points"], "a distribution registers its plugin"


def test_only_infermesh_core_provides_the_infermesh_command() -> None:
    scripts = {p.name: project(p).get("scripts", {}) for p in PACKAGES}

    assert scripts.pop("infermesh-core") == {"infermesh": "infermesh.core.cli:main"}
    assert all(not s for s in scripts.values()), scripts

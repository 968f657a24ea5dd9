"""Fixtures for the core tests: tiny plugin distributions installed on disk, logging reset."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest


class PluginDistributions:
    """Writes real distributions (a `.dist-info` with `entry_points.txt`) into a directory on
    sys.path, so `importlib.metadata.entry_points()` discovers them like installed packages."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.modules: list[str] = []

    def add(
        self,
        dist: str,
        entry_points: Mapping[str, str],
        modules: Mapping[str, str],
        version: str = "0.1.0",
    ) -> None:
        """Install `dist` declaring `entry_points` (name -> module) and `modules` (name -> code)"""
        info = self.site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = [f"{name} = {value}" for name, value in entry_points.items()]
        (info / "entry_points.txt").write_text("[infermesh]\n" + "\n".join(lines) + "\n")
        for module, code in modules.items():
            (self.site / f"{module}.py").write_text(textwrap.dedent(code))
            self.modules.append(module)


@pytest.fixture
def plugin_dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[PluginDistributions]:
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    dists = PluginDistributions(site)
    yield dists
    for module in dists.modules:
        sys.modules.pop(module, None)

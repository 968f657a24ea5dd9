"""The installed example plugins as a user sees them through `infermesh plugins list`: the
example runtime (a workspace member, installed from its folder) with its distribution, version
and hooks, inert unless a config names its kind; a broken plugin shows its error instead of
crashing the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh.core.cli import main
from infermesh.dev.harness import infermesh_command

BROKEN_DIST = "infermesh_broken_example-0.2.0.dist-info"


@pytest.fixture
def broken_site(tmp_path: Path) -> Path:
    """A site directory holding a plugin distribution whose module fails to import."""
    site = tmp_path / "site"
    (site / BROKEN_DIST).mkdir(parents=True)
    (site / BROKEN_DIST / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: infermesh-broken-example\nVersion: 0.2.0\n"
    )
    (site / BROKEN_DIST / "entry_points.txt").write_text(
        "[infermesh]\nbroken-example = im_broken_example\n"
    )
    (site / "im_broken_example.py").write_text("import not_installed_anywhere\n")
    return site


def plugins_list(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("INFERMESH_PLUGINS", None)
    env.pop("INFERMESH_PLUGINS_BLOCK", None)
    return subprocess.run(
        [*infermesh_command(), "plugins", "list", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
        check=False,
    )


def test_plugins_list_shows_the_example_runtime_and_a_broken_plugins_error(
    broken_site: Path,
) -> None:
    result = plugins_list(broken_site, "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["example-runtime"] == {
        "name": "example-runtime",
        "status": "loaded",
        "module": "infermesh_example_runtime.plugin",
        "distribution": "infermesh-example-runtime",
        "version": "0.1.0",
        "hooks": ["runtime_adapters"],
        "registered": {"runtime adapters": ["llamacpp"]},
        "error": "",
    }
    broken = rows["broken-example"]
    assert (broken["status"], broken["distribution"], broken["version"]) == (
        "failed",
        "infermesh-broken-example",
        "0.2.0",
    )
    assert broken["error"] == "ModuleNotFoundError: No module named 'not_installed_anywhere'"
    # The example scorer would join every ranking: it is not installed in the workspace.
    assert "example-scorer" not in rows
    assert "plugin 'broken-example' (im_broken_example) skipped" in result.stderr


def test_the_plugins_table_has_a_row_for_the_example_runtime_and_the_broken_plugin(
    broken_site: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(broken_site))
    monkeypatch.delenv("INFERMESH_PLUGINS", raising=False)
    monkeypatch.delenv("INFERMESH_PLUGINS_BLOCK", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["plugins", "list"])
    assert exited.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    [runtime_row] = [line for line in lines if line.startswith("example-")]
    assert runtime_row.split() == [
        "example-runtime",
        "infermesh-example-runtime",
        "0.1.0",
        "loaded",
        "runtime_adapters",
        "runtime",
        "adapters:",
        "llamacpp",
    ]
    [broken_row] = [line for line in lines if line.startswith("broken-")]
    assert broken_row.endswith(
        "error: ModuleNotFoundError: No module named 'not_installed_anywhere'"
    )
    sys.modules.pop("im_broken_example", None)

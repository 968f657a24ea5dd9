"""`infermesh plugins list` and `infermesh plugins new`: what users see, and generated packages
that pass their own tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from infermesh.core.cli import main
from infermesh.core.plugin_skeleton import PLUGIN_KINDS

if TYPE_CHECKING:
    from tests.core.conftest import PluginDistributions

RUNTIME_PLUGIN = """
from infermesh.core import hookimpl

def acme_adapter(context):
    raise RuntimeError("not started in this test")

@hookimpl
def infermesh_register_runtime_adapters(register):
    register("acme-llm", acme_adapter)
"""


@pytest.fixture
def acme_installed(plugin_dists: PluginDistributions, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin_dists.add(
        "acme-infermesh", {"acme": "im_test_acme"}, {"im_test_acme": RUNTIME_PLUGIN}, "2.3.4"
    )
    plugin_dists.add(
        "acme-broken", {"acme-broken": "im_test_acme_broken"}, {"im_test_acme_broken": "1 / 0\n"}
    )
    monkeypatch.setenv("INFERMESH_PLUGINS", "acme,acme-broken")
    monkeypatch.setenv("INFERMESH_PLUGINS_BLOCK", "dcgm")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


@pytest.mark.usefixtures("acme_installed")
def test_plugins_list_shows_distribution_version_hooks_registrations_and_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(["plugins", "list"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "DISTRIBUTION",
        "VERSION",
        "STATUS",
        "HOOKS",
        "REGISTERED",
        "/",
        "ERROR",
    ]
    rows = {line.split()[0]: line.split(None, 5) for line in lines[1:]}
    assert rows["acme"] == [
        "acme",
        "acme-infermesh",
        "2.3.4",
        "loaded",
        "runtime_adapters",
        "runtime adapters: acme-llm",
    ]
    assert rows["acme-broken"][:4] == ["acme-broken", "acme-broken", "0.1.0", "failed"]
    assert rows["acme-broken"][5] == "error: ZeroDivisionError: division by zero"
    assert rows["core"][3:5] == ["loaded", "commands,"]
    assert rows["dcgm"][3:5] == ["not", "loaded"]


@pytest.mark.usefixtures("acme_installed")
def test_plugins_list_json_has_one_object_per_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["plugins", "list", "--json"], capsys)
    assert code == 0
    by_name = {row["name"]: row for row in json.loads(out)}
    assert by_name["acme"] == {
        "name": "acme",
        "status": "loaded",
        "module": "im_test_acme",
        "distribution": "acme-infermesh",
        "version": "2.3.4",
        "hooks": ["runtime_adapters"],
        "registered": {"runtime adapters": ["acme-llm"]},
        "error": "",
    }
    broken = by_name["acme-broken"]
    assert (broken["status"], broken["error"]) == ("failed", "ZeroDivisionError: division by zero")
    assert by_name["core"]["hooks"] == ["commands", "scorers"]
    assert by_name["dcgm"]["status"] == "not loaded"


@pytest.mark.parametrize("kind", PLUGIN_KINDS)
def test_plugins_new_writes_a_package_that_passes_its_own_tests(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"acme-{kind}"
    code, out, err = run(["plugins", "new", name, "--kind", kind, "--dir", str(tmp_path)], capsys)
    assert (code, err) == (0, "")
    root = tmp_path / name
    assert out.startswith(f"created {kind} plugin {name!r} in {root}\n")
    assert (root / "pyproject.toml").read_text().count(f'{name} = "acme_{kind}.plugin"') == 1
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" in result.stdout
    assert "skipped" not in result.stdout


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Acme", "invalid plugin name 'Acme': use lower-case letters, digits and single hyphens"),
        ("acme_llm", "invalid plugin name 'acme_llm'"),
        ("acme--llm", "invalid plugin name 'acme--llm'"),
        ("9acme", "invalid plugin name '9acme'"),
        ("import", "invalid plugin name 'import': 'import' cannot be a package name"),
        ("vllm", "a plugin named 'vllm' is already installed; choose another NAME"),
        ("queue", "scorer 'queue' is already registered by plugin 'core'; two plugins cannot"),
    ],
)
def test_plugins_new_rejects_bad_names(
    name: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        ["plugins", "new", name, "--kind", "scorer", "--dir", str(tmp_path)], capsys
    )
    assert code == 2
    assert out == ""
    assert f"Error: {problem}" in err
    assert list(tmp_path.iterdir()) == []


def test_plugins_new_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "keep.txt").write_text("mine")
    code, _, err = run(["plugins", "new", "acme", "--kind", "gpu", "--dir", str(tmp_path)], capsys)
    assert code == 2
    assert f"Error: {tmp_path / 'acme'} already exists; choose another name or --dir" in err
    assert [p.name for p in (tmp_path / "acme").iterdir()] == ["keep.txt"]


def test_plugins_new_rejects_an_unknown_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["plugins", "new", "acme", "--kind", "gpus", "--dir", str(tmp_path)], capsys)
    assert code == 2
    assert "Invalid value for '--kind': 'gpus' is not one of" in err

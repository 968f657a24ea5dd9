"""The `infermesh` command: plugin subcommands; broken plugins warn, or fail when strict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from infermesh.core.cli import main

if TYPE_CHECKING:
    from tests.core.conftest import PluginDistributions

HELLO_PLUGIN = """
import click
from infermesh.core import hookimpl
from infermesh.core.config import load_config

@click.group("hello")
def hello():
    "Say hello from a third-party plugin."

@hello.command("world")
def world():
    click.echo("hello, world")

@hello.command("config")
def config():
    load_config(environ={"INFERMESH_ROUTER__MAX_ATTEMPTS": "many"})

@hookimpl
def infermesh_register_commands(register):
    register(hello)
"""


@pytest.fixture
def hello_installed(plugin_dists: PluginDistributions, monkeypatch: pytest.MonkeyPatch) -> None:
    plugin_dists.add("infermesh-hello", {"hello": "im_test_hello"}, {"im_test_hello": HELLO_PLUGIN})
    plugin_dists.add(
        "infermesh-broken", {"broken": "im_test_broken_cli"}, {"im_test_broken_cli": "1 / 0\n"}
    )
    monkeypatch.setenv("INFERMESH_PLUGINS", "hello")


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out, err


@pytest.mark.usefixtures("hello_installed")
def test_help_lists_commands_registered_by_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["--help"], capsys)
    assert code == 0
    assert "hello    Say hello from a third-party plugin." in out
    assert "plugins  List loaded plugins" in out
    assert "--strict-plugins" in out
    assert err == ""


@pytest.mark.usefixtures("hello_installed")
def test_plugin_commands_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["hello", "world"], capsys)[:2] == (0, "hello, world\n")


@pytest.mark.usefixtures("hello_installed")
def test_broken_plugin_prints_a_warning_naming_it_and_the_command_still_runs(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_PLUGINS", "hello,broken")
    code, out, err = run(["hello", "world"], capsys)
    assert code == 0
    assert out == "hello, world\n"
    assert err == (
        "infermesh: warning: plugin 'broken' (im_test_broken_cli) skipped: "
        "ZeroDivisionError: division by zero (use --strict-plugins to make this fatal)\n"
    )


@pytest.mark.usefixtures("hello_installed")
def test_strict_plugins_exits_2_naming_the_broken_plugin(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_PLUGINS", "hello,broken")
    code, out, err = run(["--strict-plugins", "hello", "world"], capsys)
    assert code == 2
    assert out == ""
    assert err == (
        "infermesh: error: plugin 'broken' (im_test_broken_cli) failed to load: "
        "ZeroDivisionError: division by zero\n"
    )


@pytest.mark.usefixtures("hello_installed")
def test_plugins_command_shows_what_each_plugin_registered_and_what_failed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_PLUGINS", "hello,broken")
    monkeypatch.setenv("INFERMESH_PLUGINS_BLOCK", "dcgm")
    code, out, _ = run(["plugins"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[:3] == [
        "loaded plugins:",
        "  core             infermesh.core.builtin (infermesh-core 0.1.0)",
        "  hello            im_test_hello (infermesh-hello 0.1.0)",
    ]
    assert lines[lines.index("commands:") + 1 :][:2] == [
        "  hello                    from hello",
        "  plugins                  from core",
    ]
    assert "scorers:" in lines
    assert "  broken           im_test_broken_cli: ZeroDivisionError: division by zero" in lines
    assert (
        "  dcgm"
        in lines[lines.index("not loaded (INFERMESH_PLUGINS / INFERMESH_PLUGINS_BLOCK):") :]
    )


@pytest.mark.usefixtures("hello_installed")
def test_misspelled_plugin_selection_is_warned_about(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_PLUGINS", "hello,helo")
    code, _, err = run(["--help"], capsys)
    assert code == 0
    assert (
        "plugin 'helo' named in INFERMESH_PLUGINS/INFERMESH_PLUGINS_BLOCK is not installed" in err
    )


@pytest.mark.usefixtures("hello_installed")
def test_config_error_in_a_subcommand_exits_2_with_the_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(["hello", "config"], capsys)
    assert code == 2
    assert err == (
        "Error: environment variable INFERMESH_ROUTER__MAX_ATTEMPTS: router.max_attempts: "
        "expected an integer, got string 'many'\n"
    )


def test_installed_script_lists_plugin_commands_and_fails_strictly(
    plugin_dists: PluginDistributions,
) -> None:
    plugin_dists.add("infermesh-hello", {"hello": "im_test_hello"}, {"im_test_hello": HELLO_PLUGIN})
    plugin_dists.add(
        "infermesh-broken", {"broken": "im_test_broken_cli"}, {"im_test_broken_cli": "1 / 0\n"}
    )
    script = Path(sys.executable).parent / "infermesh"
    env = {**os.environ, "PYTHONPATH": str(plugin_dists.site), "INFERMESH_PLUGINS": "hello,broken"}
    help_run = subprocess.run(
        [str(script), "--help"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert help_run.returncode == 0, help_run.stderr
    assert "hello" in help_run.stdout
    assert "plugin 'broken' (im_test_broken_cli) skipped" in help_run.stderr
    strict_run = subprocess.run(
        [str(script), "--strict-plugins", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert strict_run.returncode == 2
    assert "plugin 'broken' (im_test_broken_cli) failed to load" in strict_run.stderr

"""Every hook is part of the public contract: documented where declared, tested, in the guide."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from infermesh.core import hookspecs

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
GUIDE = ROOT / "docs" / "plugins.md"

HOOKS = sorted(
    name
    for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
    if hookspecs.hookspec.project_name + "_spec" in function.__dict__
)


def test_the_hook_families_of_the_architecture_are_all_declared() -> None:
    assert HOOKS == [
        "infermesh_register_commands",
        "infermesh_register_gpu_adapters",
        "infermesh_register_policy_stores",
        "infermesh_register_runtime_adapters",
        "infermesh_register_scorers",
        "infermesh_register_transports",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring_that_shows_how_to_register(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert "register(" in doc, f"{hook} docstring must show the register(...) call"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_takes_only_a_register_callback(hook: str) -> None:
    assert list(inspect.signature(getattr(hookspecs, hook)).parameters) == ["register"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook: str) -> None:
    this_file = Path(__file__).resolve()
    users = [
        path
        for path in TESTS.rglob("*.py")
        if path.resolve() != this_file and hook in path.read_text(encoding="utf-8")
    ]
    assert users, f"no test implements or calls {hook}"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_in_the_plugin_guide(hook: str) -> None:
    assert f"`{hook}`" in GUIDE.read_text(encoding="utf-8"), f"{hook} missing from {GUIDE}"

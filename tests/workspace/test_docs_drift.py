"""The generated references in docs/ are exactly what their generators write today: the
configuration reference (from the config schema), the CLI reference (from the click commands)
and the API reference (from the .proto files)."""

from __future__ import annotations

import difflib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

GENERATED = {
    "docs/config-reference.md": "scripts/gen_config_reference.py",
    "docs/cli-reference.md": "scripts/gen_cli_reference.py",
    "docs/api-reference.md": "scripts/gen_api_reference.py",
}


def generate(script: str) -> str:
    """The page `script` writes, rendered in this process (no file is written)."""
    spec = importlib.util.spec_from_file_location(Path(script).stem, ROOT / script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        text: str = module.render()
    finally:
        del sys.modules[spec.name]
    return text


@pytest.mark.parametrize(("doc", "script"), sorted(GENERATED.items()))
def test_committed_reference_matches_its_generator(doc: str, script: str) -> None:
    generated = generate(script)
    committed = (ROOT / doc).read_text(encoding="utf-8")
    if generated != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                generated.splitlines(keepends=True),
                fromfile=f"{doc} (committed)",
                tofile=f"{doc} (generated)",
                n=1,
            )
        )
        pytest.fail(f"{doc} is out of date: run `uv run python {script}`\n{diff[:4000]}")


def test_every_config_key_is_in_the_reference() -> None:
    import attrs

    from infermesh.core.config import Config

    text = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    for field in attrs.fields(Config):
        assert f"`{field.name}" in text, f"config table {field.name!r} missing"
    assert "`router.hedging.quantile`" in text
    assert "`runtimes.kind` | string | **required**" in text


def test_the_cli_reference_does_not_depend_on_commands_run_earlier() -> None:
    """click remembers a command's help option the first time it is asked for: a command run on
    its own (as tests do) then shows `--help` where the `infermesh` group gives `-h, --help`.
    The reference is what a user of the console script sees, whatever ran before it."""
    import click
    from click.testing import CliRunner

    from infermesh.core.cli import build_cli
    from infermesh.core.plugins import PluginHost

    host = PluginHost.load(allow=["core", "agent", "router", "dev"], block=[], strict=True)
    stack: list[click.Command] = [build_cli(host)]
    while stack:
        command = stack.pop()
        CliRunner().invoke(command, ["--help"])  # on its own: no root context
        if isinstance(command, click.Group):
            ctx = click.Context(command)
            stack += [c for n in command.list_commands(ctx) if (c := command.get_command(ctx, n))]
    generated = generate("scripts/gen_cli_reference.py")
    assert "| `--help` |" not in generated
    assert generated == (ROOT / "docs" / "cli-reference.md").read_text(encoding="utf-8")

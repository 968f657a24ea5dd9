"""The generated references in docs/ are exactly what their generators write today: the
configuration reference (from the config schema), the CLI reference (from the click commands)
and the API reference (from the .proto files)."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

GENERATED = {
    "docs/config-reference.md": "scripts/gen_config_reference.py",
    "docs/cli-reference.md": "scripts/gen_cli_reference.py",
    "docs/api-reference.md": "scripts/gen_api_reference.py",
}


@pytest.mark.parametrize(("doc", "script"), sorted(GENERATED.items()))
def test_committed_reference_matches_its_generator(doc: str, script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), "--stdout"],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stderr}"
    committed = (ROOT / doc).read_text(encoding="utf-8")
    if result.stdout != committed:
        diff = "".join(
            difflib.unified_diff(
                committed.splitlines(keepends=True),
                result.stdout.splitlines(keepends=True),
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

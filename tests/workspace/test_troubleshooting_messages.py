"""Every message docs/troubleshooting.md quotes (its `> ` lines) is still written by the code:
each run of literal text between `{placeholders}` appears in the source of a package."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "troubleshooting.md"
MIN_FRAGMENT = 10  # shorter runs (": ", "?)") say nothing about where a message comes from
# Implicit concatenation of string literals across lines: `"abc "\n    f"def"` -> `abc def`.
_ADJACENT_LITERALS = re.compile(r"\"\s*\n\s*[rbf]*\"")


def quoted_messages() -> list[str]:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    return [line[2:].strip() for line in lines if line.startswith("> ")]


def source_text() -> str:
    """Every package's Python source with adjacent string literals joined."""
    files = sorted((ROOT / "packages").glob("*/src/**/*.py"))
    return "\n".join(_ADJACENT_LITERALS.sub("", p.read_text(encoding="utf-8")) for p in files)


def fragments(message: str) -> list[str]:
    return [part for part in re.split(r"\{[^}]*\}", message) if len(part.strip()) >= MIN_FRAGMENT]


def test_the_page_quotes_messages() -> None:
    assert len(quoted_messages()) >= 30


def test_every_quoted_message_is_in_the_code() -> None:
    source = source_text()
    missing = [
        f"{message!r}: {part!r}"
        for message in quoted_messages()
        for part in fragments(message)
        if part not in source
    ]
    assert missing == [], "quoted in docs/troubleshooting.md but not in the code:\n" + "\n".join(
        missing
    )

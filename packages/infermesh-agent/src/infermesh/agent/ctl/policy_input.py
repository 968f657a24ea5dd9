"""What `infermesh policy set` sends: policy entries read from a TOML or JSON file or a `--value`.

Two shapes are accepted. With KIND and NAME on the command line the input is the entry's fields
(`{"nodes": ["gpu-1"]}`). Without them it is a policy document keyed kind -> name -> fields
(`[pins.llama]` tables, as `infermesh policy get` prints), checked whole before anything is sent.
Pure apart from reading the one file; every problem is a usage `CtlError` naming the file.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from infermesh.agent.ctl.errors import CtlError, ExitCode
from infermesh.core.policy import PolicyError, PolicyKind, PolicySet

__all__ = ["PolicyEntryInput", "parse_entries", "read_input"]

_DOCUMENT_KEYS = frozenset({"version", "revision"} | {kind.value for kind in PolicyKind})


@attrs.frozen
class PolicyEntryInput:
    """One entry to send with SetPolicy."""

    kind: str
    name: str
    value: Mapping[str, Any]

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}"


def _usage(message: str) -> CtlError:
    return CtlError(message, ExitCode.USAGE)


def read_input(file: Path | None, value: str | None) -> tuple[Any, str]:
    """The parsed input and where it came from (`the file F` or `--value`), from exactly one of
    `--file` (`.toml`, or JSON) and `--value` (JSON)."""
    if (file is None) == (value is None):
        raise _usage("give the policy with exactly one of --file PATH and --value JSON")
    if value is not None:
        try:
            return json.loads(value), "--value"
        except json.JSONDecodeError as exc:
            raise _usage(f"--value is not JSON: {exc}") from None
    assert file is not None
    source = f"the file {file}"
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise _usage(f"cannot read {source}: {reason}") from None
    try:
        if file.suffix.lower() == ".toml":
            return tomllib.loads(text), source
        return json.loads(text), source
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        language = "TOML" if file.suffix.lower() == ".toml" else "JSON (name it .toml for TOML)"
        raise _usage(f"{source} is not valid {language}: {exc}") from None


def _is_document(parsed: Mapping[str, Any]) -> bool:
    return bool(parsed) and set(parsed) <= _DOCUMENT_KEYS


def parse_entries(
    parsed: Any, source: str, kind: str | None = None, name: str | None = None
) -> list[PolicyEntryInput]:
    """The entries to set, in document order; CtlError (usage) for input that cannot be one."""
    if not isinstance(parsed, Mapping):
        raise _usage(f"{source}: expected a table (JSON object), got {type(parsed).__name__}")
    if (kind is None) != (name is None):
        raise _usage("give both KIND and NAME, or neither (then the input is a policy document)")
    if kind is not None and name is not None:
        try:
            PolicyKind.parse(kind)
        except PolicyError as exc:
            raise _usage(str(exc)) from None
        if _is_document(parsed):
            table = parsed.get(kind)
            entry = table.get(name) if isinstance(table, Mapping) else None
            if not isinstance(entry, Mapping):
                raise _usage(f"{source} is a policy document without a [{kind}.{name}] table")
            return [PolicyEntryInput(kind, name, dict(entry))]
        return [PolicyEntryInput(kind, name, dict(parsed))]
    if not _is_document(parsed):
        unknown = sorted(set(parsed) - _DOCUMENT_KEYS)
        detail = f"unknown key {unknown[0]!r}; " if unknown else ""
        raise _usage(
            f"{source}: {detail}without KIND and NAME the input must be a policy document with "
            f"tables of: {', '.join(kind.value for kind in PolicyKind)} (or give KIND NAME)"
        )
    try:
        PolicySet.from_document(parsed)
    except PolicyError as exc:
        raise _usage(f"{source}: {exc}") from None
    entries = [
        PolicyEntryInput(key, entry_name, dict(fields))
        for key, table in parsed.items()
        if key not in ("version", "revision")
        for entry_name, fields in table.items()
    ]
    if not entries:
        raise _usage(f"{source}: the policy document holds no entries")
    return entries

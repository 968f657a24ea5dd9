"""`infermesh policy set` input: one entry's fields with KIND NAME, or a policy document of several
entries, from TOML or JSON; anything unreadable or invalid is a usage error naming the file and
field, found before anything is sent."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.agent.ctl.errors import CtlError, ExitCode
from infermesh.agent.ctl.policy_input import PolicyEntryInput, parse_entries, read_input

DOCUMENT = """
version = 1

[pins.llama]
nodes = ["gpu-1", "gpu-2"]
min_replicas = 1

[quotas.acme]
requests_per_s = 50
"""


def entries_of(file: Path, kind: str | None = None, name: str | None = None) -> list[object]:
    parsed, source = read_input(file, None)
    return list(parse_entries(parsed, source, kind, name))


def test_a_toml_document_gives_one_entry_per_table_in_order(tmp_path: Path) -> None:
    file = tmp_path / "policy.toml"
    file.write_text(DOCUMENT)
    assert entries_of(file) == [
        PolicyEntryInput("pins", "llama", {"nodes": ["gpu-1", "gpu-2"], "min_replicas": 1}),
        PolicyEntryInput("quotas", "acme", {"requests_per_s": 50}),
    ]


def test_kind_and_name_take_the_fields_or_that_table_of_a_document(tmp_path: Path) -> None:
    fields = tmp_path / "pin.json"
    fields.write_text('{"nodes": ["gpu-3"]}')
    document = tmp_path / "policy.toml"
    document.write_text(DOCUMENT)
    assert entries_of(fields, "pins", "llama") == [
        PolicyEntryInput("pins", "llama", {"nodes": ["gpu-3"]})
    ]
    assert entries_of(document, "quotas", "acme") == [
        PolicyEntryInput("quotas", "acme", {"requests_per_s": 50})
    ]


def test_a_value_is_json(tmp_path: Path) -> None:
    parsed, source = read_input(None, '{"role": "operator"}')
    assert parse_entries(parsed, source, "acls", "bob") == [
        PolicyEntryInput("acls", "bob", {"role": "operator"})
    ]


@pytest.mark.parametrize(
    ("name", "content", "kind_name", "says"),
    [
        ("p.toml", "[pins.llama\n", (None, None), "is not valid TOML"),
        ("p.json", "{nope", (None, None), "is not valid JSON (name it .toml for TOML)"),
        (
            "p.toml",
            "[pins.llama]\nnodes = ['a']\nmin_replicas = 2\n",
            (None, None),
            "pins['llama'].min_replicas: must be <= the 1 pinned nodes, got 2",
        ),
        ("p.toml", "[pinz.llama]\nnodes = ['a']\n", (None, None), "unknown key 'pinz'"),
        ("p.toml", "version = 1\n", (None, None), "the policy document holds no entries"),
        ("p.json", "{}", ("pinz", "llama"), "unknown policy kind 'pinz'"),
        ("p.toml", DOCUMENT, ("pins", "qwen"), "without a [pins.qwen] table"),
        ("p.json", "[1, 2]", ("pins", "llama"), "expected a table (JSON object), got list"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_file(
    tmp_path: Path, name: str, content: str, kind_name: tuple[str | None, str | None], says: str
) -> None:
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(CtlError) as bad:
        entries_of(file, *kind_name)
    assert bad.value.exit_code == ExitCode.USAGE
    assert says in bad.value.message
    if "unknown policy kind" not in says:
        assert str(file) in bad.value.message


def test_an_unreadable_file_and_two_sources_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(CtlError) as missing:
        read_input(tmp_path / "nope.toml", None)
    assert f"cannot read the file {tmp_path / 'nope.toml'}: No such file" in missing.value.message
    with pytest.raises(CtlError) as both:
        read_input(tmp_path / "x.toml", "{}")
    assert "exactly one of --file PATH and --value JSON" in both.value.message

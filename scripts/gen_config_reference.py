"""Write docs/config-reference.md from the configuration schema (infermesh.core.config).

Usage: python scripts/gen_config_reference.py [--stdout]
Every table and key comes from the attrs classes themselves: type and default from the field,
the description from the attribute docstring under it in config.py. A key without a docstring is
an error, so a new key cannot reach the reference undocumented. `--stdout` prints instead of
writing (the drift test compares that with the committed file). Never edits config.py.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import attrs

from infermesh.core import config as schema

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config-reference.md"
SCRIPT = "scripts/gen_config_reference.py"

_SCALARS = {str: "string", int: "integer", float: "float", bool: "boolean", Any: "any value"}
_PLURALS = {"string": "strings", "integer": "integers", "float": "floats", "boolean": "booleans"}


@dataclass(frozen=True)
class Table:
    """One TOML table of the schema: its dotted name, its class, and how it appears in a file."""

    name: str
    cls: type
    array: bool = False
    optional: bool = False


def attribute_docs() -> dict[str, dict[str, str]]:
    """Class name -> field name -> the docstring written under that field in config.py."""
    tree = ast.parse(Path(inspect.getfile(schema)).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields: dict[str, str] = {}
        for stmt, after in zip(node.body, [*node.body[1:], None], strict=True):
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            if (
                isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
        docs[node.name] = fields
    return docs


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); any other type -> (type, False)."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(arg for arg in args if arg is not type(None)), True
    return tp, False


def tables(cls: type = schema.Config, prefix: str = "") -> Iterator[Table]:
    """Every table under `cls`, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        tp, optional = _unwrap(hints[field.name])
        name = f"{prefix}{field.name}"
        if attrs.has(tp):
            yield Table(name, tp, optional=optional)
            yield from tables(tp, f"{name}.")
        elif typing.get_origin(tp) is list and attrs.has(typing.get_args(tp)[0]):
            item = typing.get_args(tp)[0]
            yield Table(name, item, array=True)
            yield from tables(item, f"{name}.")


def is_table_field(tp: Any) -> bool:
    tp, _ = _unwrap(tp)
    if attrs.has(tp):
        return True
    return typing.get_origin(tp) is list and attrs.has(typing.get_args(tp)[0])


def type_name(tp: Any) -> str:
    """A field's type in TOML words: `float`, `list of strings`, `table of floats`, ..."""
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        item = type_name(args[0])
        return f"list of {_PLURALS.get(item, item)}"
    if origin is dict and len(args) == 2:
        if args[1] is Any:
            return "table"
        value = type_name(args[1])
        return f"table of {_PLURALS.get(value, value)}"
    return getattr(tp, "__name__", str(tp))


def toml_value(value: Any) -> str:
    """A default as it would be written in a TOML file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def default_text(field: attrs.Attribute[Any]) -> str:
    """The default of a field; computed defaults name what computes them."""
    default: Any = field.default
    if default is attrs.NOTHING:
        return "**required**"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]  # attrs types it as a function
        factory: Any = default.factory
        if default.takes_self:
            return "computed from the other keys (see description)"
        if factory in (list, dict) or getattr(factory, "__name__", "") == "<lambda>":
            return f"`{toml_value(factory())}`"
        if attrs.has(factory):
            return "(table)"
        return f"computed by `{factory.__name__}()` (see description)"
    return f"`{toml_value(default)}`"


def unit(name: str) -> str:
    """The unit a key's name carries (`_s` seconds, `_bytes` bytes), or `—`."""
    if name.endswith("_s"):
        return "seconds"
    if name.endswith("_bytes"):
        return "bytes"
    return "—"


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def env_name(dotted: str) -> str:
    return "INFERMESH_" + dotted.upper().replace(".", "__")


def section_title(table: Table) -> str:
    if table.array:
        return f"`[[{table.name}]]` (array of tables)"
    suffix = " (optional)" if table.optional else ""
    return f"`[{table.name}]`{suffix}"


def table_intro(cls: type) -> str:
    """A table's own class docstring as one paragraph, without its leading "`[name]`: "."""
    doc = vars(cls).get("__doc__")
    if not doc:
        return ""
    text = " ".join(inspect.cleandoc(doc).split())
    text = re.sub(r"^`\[\[?[\w.]+\]\]?`:\s*", "", text)
    return text[:1].upper() + text[1:]


def _doc_of(cls: type, field: str, docs: dict[str, dict[str, str]]) -> str | None:
    """A field's docstring on `cls` or, for a redeclared default, on the class it overrides."""
    for klass in cls.__mro__:
        text = docs.get(klass.__name__, {}).get(field)
        if text:
            return text
    return None


def render() -> str:
    """The whole reference page; raises SystemExit naming every key without a description."""
    docs = attribute_docs()
    missing: list[str] = []
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by {SCRIPT} from infermesh.core.config; do not edit by hand. -->",
        "",
        "Every table and key of the configuration schema (`infermesh.core.config.Config`), "
        "generated from the schema itself. How the file, `INFERMESH_*` environment variables and "
        "flags combine, the validation rules and examples are in [config.md](config.md). Any key "
        "of a table (not of an array of tables) can be set with the environment variable shown; "
        "`[[runtimes]]` and `[[gpus]]` are replaced as a whole by `INFERMESH_RUNTIMES` / "
        "`INFERMESH_GPUS` holding a TOML inline array.",
        "",
        f"Regenerate after changing the schema: `uv run python {SCRIPT}`.",
        "",
        "Top-level tables: "
        + ", ".join(f"`{t.name}`" for t in tables() if "." not in t.name)
        + ".",
    ]
    for table in tables():
        lines += ["", f"## {section_title(table)}", ""]
        intro = table_intro(table.cls)
        if intro:
            lines += [intro, ""]
        hints = typing.get_type_hints(table.cls)
        lines += [
            "| key | type | default | unit | description |",
            "|---|---|---|---|---|",
        ]
        rows = 0
        for field in attrs.fields(table.cls):
            if is_table_field(hints[field.name]):
                continue
            dotted = f"{table.name}.{field.name}"
            description = _doc_of(table.cls, field.name, docs)
            if description is None:
                missing.append(f"{table.cls.__name__}.{field.name} ({dotted})")
                description = ""
            if not table.array:
                description += f" Environment: `{env_name(dotted)}`."
            tp, _ = _unwrap(hints[field.name])
            lines.append(
                f"| `{dotted}` | {type_name(tp)} | {cell(default_text(field))} "
                f"| {unit(field.name)} | {cell(description)} |"
            )
            rows += 1
        if rows == 0:
            lines[-2:] = ["Only the tables below."]
    if missing:
        raise SystemExit(
            "keys without a docstring in infermesh/core/config.py (write one under each field):\n  "
            + "\n  ".join(missing)
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args()
    text = render()
    if args.stdout:
        sys.stdout.write(text)
    else:
        OUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

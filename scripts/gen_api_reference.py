"""Write docs/api-reference.md from the .proto files of infermesh-core.

Usage: python scripts/gen_api_reference.py [--stdout]
Compiles every .proto under infermesh/core/proto with protoc (grpc_tools) into descriptors with
source info, then writes each file's services, RPCs, messages, enums and fields with the
comments written beside them. `--stdout` prints instead of writing (the drift test compares that
with the committed file). Never edits a .proto or the generated code.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "packages" / "infermesh-core" / "src"
PROTO_DIR = SRC / "infermesh" / "core" / "proto"
OUT = ROOT / "docs" / "api-reference.md"
SCRIPT = "scripts/gen_api_reference.py"

# Field numbers of the descriptor messages, as SourceCodeInfo paths use them.
_FILE_PACKAGE, _FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX = 2, 4, 5, 6, 12
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALAR_NAMES = {
    _FDP.TYPE_DOUBLE: "double",
    _FDP.TYPE_FLOAT: "float",
    _FDP.TYPE_INT64: "int64",
    _FDP.TYPE_UINT64: "uint64",
    _FDP.TYPE_INT32: "int32",
    _FDP.TYPE_FIXED64: "fixed64",
    _FDP.TYPE_FIXED32: "fixed32",
    _FDP.TYPE_BOOL: "bool",
    _FDP.TYPE_STRING: "string",
    _FDP.TYPE_BYTES: "bytes",
    _FDP.TYPE_UINT32: "uint32",
    _FDP.TYPE_SFIXED32: "sfixed32",
    _FDP.TYPE_SFIXED64: "sfixed64",
    _FDP.TYPE_SINT32: "sint32",
    _FDP.TYPE_SINT64: "sint64",
}


def descriptors() -> list[descriptor_pb2.FileDescriptorProto]:
    """Every .proto of infermesh-core compiled with its comments, in file-name order."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{SRC}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *[str(p) for p in protos],
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return sorted(files.file, key=lambda f: f.name)


class Comments:
    """The comments of one file, looked up by SourceCodeInfo path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(loc.path): loc for loc in file.source_code_info.location}

    def of(self, path: Sequence[int]) -> str:
        """Leading and trailing comments of the element at `path`, as one paragraph."""
        loc = self._by_path.get(tuple(path))
        if loc is None:
            return ""
        parts = [loc.leading_comments, loc.trailing_comments]
        return " ".join(" ".join(part.split()) for part in parts if part.strip())

    def header(self) -> str:
        """The file's opening comment (above `syntax`), paragraphs kept."""
        loc = self._by_path.get((_FILE_SYNTAX,))
        if loc is None:
            return ""
        texts = [*loc.leading_detached_comments, loc.leading_comments]
        paragraphs: list[str] = []
        for text in texts:
            for block in text.split("\n\n"):
                joined = " ".join(line.strip() for line in block.splitlines() if line.strip())
                if joined:
                    paragraphs.append(joined)
        return "\n\n".join(paragraphs)


def cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def short_type(name: str, package: str) -> str:
    """`.infermesh.v1.TargetKey` -> `TargetKey` inside its own package, else the full name."""
    name = name.lstrip(".")
    return name[len(package) + 1 :] if package and name.startswith(package + ".") else name


def field_type(
    field: descriptor_pb2.FieldDescriptorProto,
    message: descriptor_pb2.DescriptorProto,
    package: str,
) -> str:
    """The field's type as written in the .proto: `repeated X`, `map<K, V>`, `optional T`."""
    if field.type in (_FDP.TYPE_MESSAGE, _FDP.TYPE_ENUM):
        base = short_type(field.type_name, package)
    else:
        base = _SCALAR_NAMES[field.type]
    if field.label == _FDP.LABEL_REPEATED:
        entry_name = field.type_name.rsplit(".", 1)[-1]
        for nested in message.nested_type:
            if nested.name == entry_name and nested.options.map_entry:
                key, value = nested.field[0], nested.field[1]
                return (
                    f"map<{field_type(key, nested, package)}, {field_type(value, nested, package)}>"
                )
        return f"repeated {base}"
    if field.proto3_optional:
        return f"optional {base}"
    return base


def render_enum(
    enum: descriptor_pb2.EnumDescriptorProto,
    path: list[int],
    qualified: str,
    comments: Comments,
) -> list[str]:
    lines = [f"#### enum `{qualified}`", ""]
    if text := comments.of(path):
        lines += [text, ""]
    lines += ["| value | number | description |", "|---|---|---|"]
    for index, value in enumerate(enum.value):
        description = cell(comments.of([*path, _ENUM_VALUE, index]))
        lines.append(f"| `{value.name}` | {value.number} | {description} |")
    return [*lines, ""]


def render_message(
    message: descriptor_pb2.DescriptorProto,
    path: list[int],
    qualified: str,
    package: str,
    comments: Comments,
) -> list[str]:
    if message.options.map_entry:
        return []
    lines = [f"#### message `{qualified}`", ""]
    if text := comments.of(path):
        lines += [text, ""]
    if message.field:
        lines += ["| field | number | type | description |", "|---|---|---|---|"]
        for index, field in enumerate(message.field):
            description = cell(comments.of([*path, _MESSAGE_FIELD, index]))
            if field.HasField("oneof_index") and not field.proto3_optional:
                oneof = message.oneof_decl[field.oneof_index].name
                description = f"One of `{oneof}`. {description}".strip()
            kind = cell(field_type(field, message, package))
            lines.append(f"| `{field.name}` | {field.number} | `{kind}` | {description} |")
        lines.append("")
    else:
        lines += ["No fields.", ""]
    for index, nested in enumerate(message.nested_type):
        nested_path = [*path, _MESSAGE_NESTED, index]
        lines += render_message(
            nested, nested_path, f"{qualified}.{nested.name}", package, comments
        )
    for index, enum in enumerate(message.enum_type):
        lines += render_enum(
            enum, [*path, _MESSAGE_ENUM, index], f"{qualified}.{enum.name}", comments
        )
    return lines


def render_file(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    comments = Comments(file)
    name = Path(file.name).name
    lines = [f"## {name}", "", f"Package `{file.package}`; source `{file.name}`.", ""]
    if header := comments.header():
        lines += [header, ""]
    for index, service in enumerate(file.service):
        lines += [f"### service `{file.package}.{service.name}`", ""]
        if text := comments.of([_FILE_SERVICE, index]):
            lines += [text, ""]
        lines += ["| RPC | request | response | description |", "|---|---|---|---|"]
        for method_index, method in enumerate(service.method):
            request = short_type(method.input_type, file.package)
            response = short_type(method.output_type, file.package)
            if method.client_streaming:
                request = f"stream {request}"
            if method.server_streaming:
                response = f"stream {response}"
            description = cell(comments.of([_FILE_SERVICE, index, _SERVICE_METHOD, method_index]))
            lines.append(f"| `{method.name}` | `{request}` | `{response}` | {description} |")
        lines.append("")
    if file.message_type or file.enum_type:
        lines += ["### Messages and enums", ""]
    for index, message in enumerate(file.message_type):
        lines += render_message(
            message, [_FILE_MESSAGE, index], message.name, file.package, comments
        )
    for index, enum in enumerate(file.enum_type):
        lines += render_enum(enum, [_FILE_ENUM, index], enum.name, comments)
    return lines


def render() -> str:
    """The whole reference page."""
    files = descriptors()
    lines = [
        "# API reference",
        "",
        f"<!-- Generated by {SCRIPT} from the .proto files; do not edit by hand. -->",
        "",
        "The gRPC services and messages of InferMesh, from the `.proto` files in "
        "`packages/infermesh-core/src/infermesh/core/proto/` and the comments written in them. "
        "Who serves what, on which address and with which credentials: "
        "[agent.md](agent.md) (Scoring and State), [control-api.md](control-api.md) (Control, "
        "roles and statuses), [gossip.md](gossip.md) (the gossip wire format), "
        "[router.md](router.md) (the KServe v2 gRPC ingress).",
        "",
        f"Regenerate after changing a `.proto`: `uv run python {SCRIPT}` (and "
        "`uv run python scripts/gen_proto.py` for the generated code).",
        "",
        "| file | package | services |",
        "|---|---|---|",
    ]
    for file in files:
        name = Path(file.name).name
        services = ", ".join(f"`{s.name}`" for s in file.service) or "—"
        anchor = name.replace(".", "")
        lines.append(f"| [{name}](#{anchor}) | `{file.package}` | {services} |")
    lines.append("")
    for file in files:
        lines += render_file(file)
    return "\n".join(lines).rstrip("\n") + "\n"


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

"""Regenerate the committed protobuf/gRPC code of infermesh-core.

Usage: python scripts/gen_proto.py [--out DIR | --check]
Without options it rewrites the generated files in place. `--out DIR` writes them under DIR
(as DIR/infermesh/core/proto/...); `--check` exits 1 listing every file that regenerating would
change. The test suite runs `--out` into a temporary directory and compares. Never edits .proto
files; needs the dev dependencies (grpcio-tools, mypy-protobuf) installed in this interpreter.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "packages" / "infermesh-core" / "src"
PROTO_DIR = SRC / "infermesh" / "core" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> Path:
    """A protoc plugin script installed beside this interpreter (by mypy-protobuf)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev dependencies (uv sync)")
    return Path(found)


def generate(out: Path) -> list[Path]:
    """Compile every .proto under PROTO_DIR into `out`; return the generated files."""
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{SRC}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out=quiet:{out}",
        f"--mypy_grpc_out=quiet:{out}",
        *[str(p) for p in protos],
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    return sorted(p for p in out.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def committed() -> list[Path]:
    """The generated files currently in the source tree."""
    return sorted(p for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def differences(out: Path) -> list[str]:
    """Relative paths that differ between a generation in `out` and the source tree."""
    fresh = {p.relative_to(out): p.read_bytes() for p in generate(out)}
    current = {p.relative_to(SRC): p.read_bytes() for p in committed()}
    return sorted(
        str(path) for path in fresh.keys() | current.keys() if fresh.get(path) != current.get(path)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", type=Path, default=None, help="write the files under this dir")
    group.add_argument("--check", action="store_true", help="exit 1 if regenerating changes code")
    args = parser.parse_args()
    if args.out is not None:
        generate(args.out)
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.check:
            changed = differences(tmp)
            for name in changed:
                print(f"out of date: {name}")
            raise SystemExit(1 if changed else 0)
        for path in generate(tmp):
            target = SRC / path.relative_to(tmp)
            shutil.copyfile(path, target)
            print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

"""Regenerate the committed protobuf/gRPC code of infermesh-core.

Usage: python scripts/gen_proto.py [--out DIR]
Without --out it rewrites the files in place; the test suite runs it into a temporary
directory and fails when the output differs from what is committed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "packages" / "infermesh-core" / "src"
PROTO_DIR = SRC / "infermesh" / "core" / "proto"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out: Path) -> list[Path]:
    """Compile every .proto under PROTO_DIR into `out`; return the generated files."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{SRC}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.out is not None:
        generate(args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            target = SRC / path.relative_to(tmp)
            shutil.copyfile(path, target)
            print(f"wrote {target.relative_to(ROOT)}")


if __name__ == "__main__":
    main()

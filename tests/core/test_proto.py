"""The committed protobuf/gRPC code is exactly what scripts/gen_proto.py generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "packages" / "infermesh-core" / "src"
PROTO_DIR = SRC / "infermesh" / "core" / "proto"
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_regenerating_the_protobuf_code_changes_nothing(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = sorted(
        p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.name.endswith(GENERATED)
    )
    committed = sorted(
        p.relative_to(SRC) for p in PROTO_DIR.iterdir() if p.name.endswith(GENERATED)
    )
    assert fresh == committed, "generated files added or removed: run scripts/gen_proto.py"
    stale = [str(p) for p in fresh if (tmp_path / p).read_bytes() != (SRC / p).read_bytes()]
    assert stale == [], f"out of date, run `uv run python scripts/gen_proto.py`: {stale}"


def test_every_proto_source_has_its_generated_modules() -> None:
    for proto in sorted(PROTO_DIR.glob("*.proto")):
        for suffix in GENERATED:
            assert (PROTO_DIR / f"{proto.stem}{suffix}").is_file(), (
                f"{proto.name}: {suffix} missing"
            )


def test_generated_services_import_and_declare_the_api() -> None:
    from infermesh.core.proto import scoring_pb2, state_pb2

    scoring = scoring_pb2.DESCRIPTOR.services_by_name["Scoring"]
    assert {m.name for m in scoring.methods} >= {"ScoreTargets", "Admit", "ReportOutcome"}
    assert scoring_pb2.DESCRIPTOR.package == "infermesh.v1"
    assert "State" in state_pb2.DESCRIPTOR.services_by_name

"""What a user gets from the package index: the sdists and wheels of infermesh-core, -agent and
-vllm pass `twine check`, carry their metadata, licence, typing marker and protobuf files, and
`pip install infermesh-agent infermesh-vllm` from those wheels in a fresh virtual environment gives
a working `infermesh` command with the vLLM plugin loaded.

Builds with `uv build` (the release script, scripts/build_dists.sh, uses `python -m build`; both run
hatchling in an isolated environment). Third-party dependencies come from the package index at the
versions in uv.lock; without the index the tests are skipped, except under CI where they fail."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from pathlib import Path

import pytest

pytestmark = [pytest.mark.packaging, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[2]
VERSION = str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])
BUILT = ("infermesh-core", "infermesh-agent", "infermesh-vllm")
SDIST_TOP = {"LICENSE", "README.md", "pyproject.toml", "PKG-INFO", ".gitignore"}
# What uv prints when it cannot reach the package index.
UNREACHABLE = (
    "error sending request",
    "dns error",
    "tcp connect error",
    "Failed to fetch",
    "Could not connect",
    "network was disabled",
)


def uv_binary() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        pytest.skip("uv is not on PATH (run the tests through `uv run` or ./dev test)")
    return found


def run_uv(*args: str | Path, cwd: Path) -> None:
    run_uv_together([args], cwd=cwd)


def run_uv_together(commands: list[tuple[str | Path, ...]], cwd: Path) -> None:
    """Run uv commands side by side, outside the workspace's settings; skip (fail under CI) when
    the package index cannot be reached."""
    env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "UV_PYTHON"}}
    uv = uv_binary()
    running = [
        subprocess.Popen(
            [uv, *map(str, args)],
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    errors = [process.communicate(timeout=110)[1] for process in running]
    for args, process, stderr in zip(commands, running, errors, strict=True):
        if process.returncode != 0 and any(sign in stderr for sign in UNREACHABLE):
            reason = f"package index unreachable: {stderr.strip().splitlines()[-1].strip()}"
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the packaging tests; {reason}")
            pytest.skip(reason)
        assert process.returncode == 0, f"uv {' '.join(map(str, args))} failed:\n{stderr}"


def artifact(dist_dir: Path, distribution: str, suffix: str) -> Path:
    return dist_dir / f"{distribution.replace('-', '_')}-{VERSION}{suffix}"


def wheel(dist_dir: Path, distribution: str) -> zipfile.ZipFile:
    return zipfile.ZipFile(artifact(dist_dir, distribution, "-py3-none-any.whl"))


def dist_info(distribution: str) -> str:
    return f"{distribution.replace('-', '_')}-{VERSION}.dist-info"


def metadata(dist_dir: Path, distribution: str) -> Message:
    with wheel(dist_dir, distribution) as whl:
        text = whl.read(f"{dist_info(distribution)}/METADATA").decode()
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text)


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sdist and wheel (built from that sdist) of core, agent and vllm."""
    out = tmp_path_factory.mktemp("dist")
    run_uv_together(
        [("build", "--package", name, "--out-dir", out, "--quiet") for name in BUILT], cwd=ROOT
    )
    return out


@pytest.fixture(scope="module")
def venv(dist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment (this Python) with `infermesh-agent infermesh-vllm` installed
    by name: ours only from the built wheels, third-party ones at uv.lock's versions."""
    work = tmp_path_factory.mktemp("install")
    constraints = work / "constraints.txt"
    run_uv(
        "export", "--frozen", "--no-hashes", "--all-packages", "--no-emit-workspace",
        "--format", "requirements-txt", "--no-header", "--quiet", "--output-file", constraints,
        cwd=ROOT,
    )  # fmt: skip
    env_dir = work / "venv"
    run_uv("venv", "--no-config", "--quiet", "--python", sys.executable, env_dir, cwd=work)
    run_uv(
        "pip", "install", "--no-config", "--quiet", "--python", env_dir / "bin" / "python",
        "--find-links", dist_dir, "--constraint", constraints,
        "infermesh-agent", "infermesh-vllm",
        cwd=work,
    )  # fmt: skip
    return env_dir


def test_sdists_and_wheels_pass_twine_check(dist_dir: Path) -> None:
    files = sorted([*dist_dir.glob("*.whl"), *dist_dir.glob("*.tar.gz")])
    assert {f.name for f in files} == {
        artifact(dist_dir, d, s).name for d in BUILT for s in (".tar.gz", "-py3-none-any.whl")
    }

    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == len(files)


def test_wheel_metadata_has_the_version_licence_and_exact_pins(dist_dir: Path) -> None:
    for distribution in BUILT:
        meta = metadata(dist_dir, distribution)
        assert meta["Name"] == distribution
        assert meta["Version"] == VERSION
        assert meta["License-Expression"] == "Apache-2.0"
        assert meta["Requires-Python"] == ">=3.11"
        assert "Typing :: Typed" in meta.get_all("Classifier", [])
        assert meta["Description-Content-Type"] == "text/markdown"
        assert re.search(rf"pip install [^\n]*{distribution}\b", str(meta.get_payload()))
        ours = [r for r in meta.get_all("Requires-Dist", []) if r.startswith("infermesh-")]
        expected = [] if distribution == "infermesh-core" else [f"infermesh-core=={VERSION}"]
        assert ours == expected
        with wheel(dist_dir, distribution) as whl:
            licence = whl.read(f"{dist_info(distribution)}/licenses/LICENSE")
        assert licence == (ROOT / "LICENSE").read_bytes()


def test_entry_points_core_provides_the_cli_and_each_its_plugin(dist_dir: Path) -> None:
    for distribution in BUILT:
        with wheel(dist_dir, distribution) as whl:
            entry_points = whl.read(f"{dist_info(distribution)}/entry_points.txt").decode()
        package = distribution.removeprefix("infermesh-")
        assert "[infermesh]" in entry_points
        assert f"infermesh.{package}." in entry_points
        has_script = "infermesh = infermesh.core.cli:main" in entry_points
        assert has_script == (distribution == "infermesh-core")


def test_wheels_and_sdists_carry_typing_and_protobuf_files_but_no_tests_or_caches(
    dist_dir: Path,
) -> None:
    proto_dir = ROOT / "packages/infermesh-core/src/infermesh/core/proto"
    generated = {
        f"infermesh/core/proto/{proto.stem}{suffix}"
        for proto in proto_dir.glob("*.proto")
        for suffix in (".proto", "_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
    }
    assert len(generated) >= 5
    for distribution in BUILT:
        package = distribution.removeprefix("infermesh-")
        with wheel(dist_dir, distribution) as whl:
            names = set(whl.namelist())
        with tarfile.open(artifact(dist_dir, distribution, ".tar.gz")) as sdist:
            sdist_names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        assert f"infermesh/{package}/py.typed" in names
        assert f"src/infermesh/{package}/py.typed" in sdist_names
        assert {"LICENSE", "README.md", "pyproject.toml"} <= sdist_names
        if distribution == "infermesh-core":
            assert generated <= names
            assert {f"src/{name}" for name in generated} <= sdist_names
        for name in names | sdist_names:
            assert "__pycache__" not in name, name
            assert not name.endswith(".pyc"), name
        # Only the package itself: no tests, docs or other distributions' modules.
        for name in names:
            assert name.startswith((f"infermesh/{package}/", dist_info(distribution))), name
        for name in sdist_names:
            assert name.startswith(f"src/infermesh/{package}/") or name in SDIST_TOP, name


def test_clean_venv_install_gives_the_infermesh_command_with_the_vllm_plugin(
    venv: Path, dist_dir: Path
) -> None:
    infermesh = venv / "bin" / "infermesh"

    # Both at once: the first start of a fresh environment is slow on a busy machine.
    runs = [
        subprocess.Popen(
            [infermesh, "--strict-plugins", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in (["--help"], ["agent", "run", "--help"])
    ]
    (top_out, top_err), (run_out, run_err) = (p.communicate(timeout=90) for p in runs)

    assert runs[0].returncode == 0, top_err
    commands = {line.split()[0] for line in top_out.split("Commands:")[1].splitlines() if line}
    assert {"agent", "plugins", "nodes", "models"} <= commands
    assert "router" not in commands  # infermesh-router is not installed
    assert runs[1].returncode == 0, run_err
    assert "Run the agent until SIGTERM or SIGINT." in run_out
    assert "--config" in run_out


def test_clean_venv_has_our_distributions_from_the_built_wheels_only(
    venv: Path, dist_dir: Path
) -> None:
    probe = (
        "import json; from importlib.metadata import distributions, entry_points\n"
        "ours = {d.metadata['Name']: [d.version, d.read_text('RECORD')] for d in distributions()"
        " if d.metadata['Name'].startswith('infermesh')}\n"
        "plugins = {ep.name: [ep.value, ep.dist.metadata['Name'], ep.load().__name__]"
        " for ep in entry_points(group='infermesh')}\n"
        "print(json.dumps({'ours': ours, 'plugins': plugins}))"
    )
    result = subprocess.run(
        [venv / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)

    assert {name: v for name, (v, _) in found["ours"].items()} == dict.fromkeys(BUILT, VERSION)
    for distribution in BUILT:
        with wheel(dist_dir, distribution) as whl:
            built = whl.read(f"{dist_info(distribution)}/RECORD").decode().splitlines()
        installed = set(found["ours"][distribution][1].splitlines())
        # Every file with its hash as it is in the wheel we built (not one from an index).
        assert {line for line in built if ",sha256=" in line} <= installed, distribution
    module, distribution, loaded = found["plugins"]["vllm"]
    assert (module, distribution) == ("infermesh.vllm.plugin", "infermesh-vllm")
    assert loaded == "infermesh.vllm.plugin"  # it imports in the clean environment
    assert set(found["plugins"]) == {"core", "agent", "vllm"}

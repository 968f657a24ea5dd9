"""The examples of docs/deployment.md and docs/quickstart.md stay usable: the three node
configs of examples/three-node and the quick start's config load through the real config loader,
and the systemd units of examples/systemd run real `infermesh` commands with paths the configs
use."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infermesh.core.config import Config, load_config, parse_host_port

ROOT = Path(__file__).resolve().parents[2]
THREE_NODE = sorted((ROOT / "examples" / "three-node").glob("node-*.toml"))
UNITS = ROOT / "examples" / "systemd"
INSTALLED_CONFIG = "/etc/infermesh/infermesh.toml"


def load_example(path: Path, tmp_path: Path) -> Config:
    """The file through load_config, its raft.password_file pointed at a real secret file."""
    secret = tmp_path / "raft.secret"
    secret.write_text("example-secret\n")
    return load_config(path, environ={}, overrides=[("raft.password_file", str(secret))])


def service_section(name: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNITS / name, encoding="utf-8")
    return parser["Service"]


def test_there_are_three_node_configs() -> None:
    assert [p.name for p in THREE_NODE] == ["node-1.toml", "node-2.toml", "node-3.toml"]


@pytest.mark.parametrize("path", THREE_NODE, ids=lambda p: p.name)
def test_node_config_loads_and_names_its_own_addresses(path: Path, tmp_path: Path) -> None:
    config = load_example(path, tmp_path)
    assert config.raft is not None
    assert config.raft.password == "example-secret"
    host = parse_host_port(config.gossip.advertise)[0]
    assert parse_host_port(config.raft.listen)[0] == host
    assert parse_host_port(config.control.listen)[0] == host
    assert config.node.id in Path(config.control.cert).name
    assert config.gossip.enabled
    assert config.gossip.key_file
    assert [r.kind for r in config.runtimes] == ["vllm"]


def test_the_three_nodes_form_one_mesh(tmp_path: Path) -> None:
    configs = [load_example(path, tmp_path) for path in THREE_NODE]
    assert len({c.node.id for c in configs}) == 3
    voters = {c.raft.listen for c in configs if c.raft is not None}
    for config in configs:
        assert config.raft is not None
        assert set(config.raft.voters) == voters
        assert set(config.gossip.seeds) == {c.gossip.advertise for c in configs}
        assert config.control.ca == configs[0].control.ca


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("infermesh-agent.service", ["agent", "run"]),
        ("infermesh-router.service", ["router", "run"]),
    ],
)
def test_systemd_unit_runs_a_real_command_on_the_example_config(
    unit: str, command: list[str]
) -> None:
    service = service_section(unit)
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "infermesh"
    assert argv[1:3] == command
    assert argv[argv.index("--config") + 1] == INSTALLED_CONFIG
    for key in ("User", "Restart", "LimitNOFILE", "ProtectSystem", "EnvironmentFile"):
        assert service.get(key), f"{unit}: {key}= missing"
    # docs/cli-reference.md is the real CLI (test_docs_drift keeps it so): the command exists
    # and takes --config.
    reference = (ROOT / "docs" / "cli-reference.md").read_text(encoding="utf-8")
    heading = f"## infermesh {' '.join(command)}\n"
    assert heading in reference, f"{unit}: no `infermesh {' '.join(command)}` command"
    section = reference.split(heading, 1)[1].split("\n## ", 1)[0]
    assert "`--config " in section


def test_agent_unit_provides_the_socket_and_state_directories_the_configs_use(
    tmp_path: Path,
) -> None:
    service = service_section("infermesh-agent.service")
    config = load_example(THREE_NODE[0], tmp_path)
    assert Path(config.agent.socket).parent == Path("/run") / service["RuntimeDirectory"]
    assert Path(config.agent_data_dir()) == Path("/var/lib") / service["StateDirectory"]
    assert all(f"{INSTALLED_CONFIG} on node-" in p.read_text() for p in THREE_NODE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "infermesh"
    for unit in ("infermesh-agent.service", "infermesh-router.service"):
        text = (UNITS / unit).read_text().replace("/opt/infermesh/bin/infermesh", str(script))
        (tmp_path / unit).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(p) for p in sorted(tmp_path.glob("*.service")))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr


def test_quickstart_config_loads(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    path = tmp_path / "infermesh.toml"
    path.write_text(blocks[0])
    config = load_config(path, environ={})
    assert config.control.listen == "127.0.0.1:7960"
    assert [r.url for r in config.runtimes] == ["http://127.0.0.1:8000"]

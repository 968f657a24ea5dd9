"""The operator CLI against a real in-process agent serving the Control API over mutual TLS, with
an emulated vLLM runtime: tables and --json for nodes, models, policy and events, and the exit
code of each failure (2 bad input, 3 not found, 4 refused, 5 unreachable).

The CLI is synchronous, so each command runs in a worker thread while the agent serves on the
test's event loop.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import anyio.abc
import click
import pytest
from click.testing import CliRunner, Result

from infermesh.agent import plugin as agent_plugin
from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.ctl.errors import ExitCode
from infermesh.agent.daemon import Agent
from infermesh.core import builtin as core_plugin
from infermesh.core.cli import build_cli
from infermesh.core.config import AgentConfig, Config, ControlConfig, NodeConfig, RuntimeConfig
from infermesh.core.logging import configure_logging
from infermesh.core.plugins import PluginHost
from infermesh.dev.harness import infermesh_command
from infermesh.dev.profiles import GpuProfile
from infermesh.dev.vllm_emulator import EmulatorConfig, start_emulator
from infermesh.vllm import plugin as vllm_plugin

pytestmark = pytest.mark.anyio

DEADLINE_S = 5.0
CLI_START_S = 20.0  # a CLI subprocess imports every plugin; slow on a loaded machine
MODEL = "llama"
FAST_GPU = GpuProfile(
    name="test-fast",
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.001,
    step_per_seq_s=0.0,
    num_gpu_blocks=256,
    max_model_len=1024,
)
USERS = {"n1": "node", "ops": "operator", "grafana": "viewer", "alice": "admin"}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pki(workdir: Path) -> Path:
    directory = workdir / "certs"
    init_ca_dir(directory, days=2)
    for name, role in USERS.items():
        hosts = ["127.0.0.1"] if role == "node" else []
        issue_to_dir(directory, Identity(name, role), hosts=hosts)  # type: ignore[arg-type]
    init_ca_dir(workdir / "other", days=2)
    issue_to_dir(workdir / "other", Identity("mallory", "admin"))
    return directory


@pytest.fixture
def cli() -> click.Group:
    host = PluginHost.load(
        entry_point_list=[], extra=[("core", core_plugin), ("agent", agent_plugin)]
    )
    return build_cli(host)


def agent_config(workdir: Path, pki: Path, runtimes: Sequence[str] = ()) -> Config:
    return Config(
        node=NodeConfig(id="n1", zone="z1"),
        agent=AgentConfig(
            socket=str(workdir / "n1.sock"),
            metrics_listen="",
            shutdown_grace_s=2.0,
            data_dir=str(workdir / "data"),
        ),
        control=ControlConfig(
            listen="127.0.0.1:0",
            cert=str(pki / "n1.pem"),
            key=str(pki / "n1-key.pem"),
            ca=str(pki / "ca.pem"),
        ),
        runtimes=[
            RuntimeConfig(kind="vllm", url=url, poll_interval_s=0.05, timeout_s=1.0)
            for url in runtimes
        ],
    )


def build_agent(config: Config) -> Agent:
    host = PluginHost.load(
        entry_point_list=[],
        extra=[("core", core_plugin), ("agent", agent_plugin), ("vllm", vllm_plugin)],
    )
    return Agent(config, host)


@asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Agent]:
    # The agent logs to stdout by default, and CliRunner captures stdout process-wide.
    configure_logging("warning", "json", stream=io.StringIO())  # undone by tests/conftest.py
    # Loading plugins and reading the TLS files is synchronous work; keep it off the loop.
    running = await anyio.to_thread.run_sync(build_agent, config)
    async with anyio.create_task_group() as tg:
        await tg.start(partial(running.run, handle_signals=False))
        try:
            yield running
        finally:
            running.request_stop()


@pytest.fixture
async def agent(workdir: Path, pki: Path) -> AsyncIterator[Agent]:
    """An agent with the Control API and no runtime."""
    async with serving(agent_config(workdir, pki)) as running:
        yield running


@pytest.fixture
async def vllm_agent(workdir: Path, pki: Path) -> AsyncIterator[Agent]:
    """An agent with the Control API watching one emulated vLLM server of MODEL."""
    emulator = await start_emulator(EmulatorConfig(model=MODEL, profile=FAST_GPU))
    try:
        async with serving(agent_config(workdir, pki, [emulator.url])) as running:
            yield running
    finally:
        await emulator.aclose()


def endpoint(agent: Agent) -> str:
    assert agent.control is not None
    assert agent.control.port
    return f"127.0.0.1:{agent.control.port}"


def tls_args(pki: Path, user: str) -> list[str]:
    return [
        *("--ca", str(pki / "ca.pem")),
        *("--cert", str(pki / f"{user}.pem")),
        *("--key", str(pki / f"{user}-key.pem")),
    ]


async def invoke(
    cli: click.Group, args: Sequence[str], env: Mapping[str, str | None] | None = None
) -> Result:
    """Run `infermesh ARGS` in a worker thread (the agent serves on this loop)."""
    runner = CliRunner()
    # No profile file of the user running the tests may leak in.
    full_env: dict[str, str | None] = {"INFERMESH_CLI_CONFIG": None, "XDG_CONFIG_HOME": "/none"}
    full_env.update(env or {})
    return await anyio.to_thread.run_sync(
        partial(runner.invoke, cli, list(args), env=full_env, catch_exceptions=False)
    )


class Operator:
    """Runs CLI commands against one agent as one user."""

    def __init__(self, cli: click.Group, agent: Agent, pki: Path, user: str) -> None:
        self._cli = cli
        self._flags = ["--endpoint", endpoint(agent), *tls_args(pki, user)]

    async def __call__(self, *args: str) -> Result:
        return await invoke(self._cli, [*args, *self._flags])

    async def json(self, *args: str) -> object:
        result = await self(*args, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


async def wait_for_model(viewer: Operator) -> None:
    deadline = anyio.current_time() + DEADLINE_S
    while True:
        listed = await viewer.json("models", "list")
        assert isinstance(listed, dict)
        if [model["name"] for model in listed["models"]] == [MODEL]:
            return
        if anyio.current_time() > deadline:
            pytest.fail(f"the agent never listed {MODEL}: {listed}")
        await anyio.sleep(0.05)


async def test_an_operator_drains_the_node_and_nodes_list_shows_it(
    cli: click.Group, agent: Agent, pki: Path
) -> None:
    ops = Operator(cli, agent, pki, "ops")

    drained = await ops("nodes", "drain", "n1", "--reason", "kernel upgrade")
    listed = await ops("nodes", "list")
    as_json = await ops.json("nodes", "list")
    undrained = await ops("nodes", "undrain", "n1")
    again = await ops("nodes", "undrain", "n1")

    assert drained.exit_code == 0, drained.output
    assert drained.stdout.startswith("drained n1 (kernel upgrade): it gets no new requests")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()[:2]
    assert header.split() == ["NODE", "STATE", "ZONE", "DRAINED", "TARGETS", "GPUS", "RTT"]
    assert row.split()[:6] == ["n1", "(self)", "alive", "z1", "yes", "(kernel"]
    assert "policy store: local; role single; no leader known; revision 1" in listed.stdout
    assert all(line == line.rstrip() for line in listed.stdout.splitlines())
    assert isinstance(as_json, dict)
    (node,) = as_json["nodes"]
    assert (node["name"], node["drained"], node["drain_reason"]) == ("n1", True, "kernel upgrade")
    assert as_json["policy_store"]["backend"] == "local"
    assert undrained.exit_code == 0
    assert "undrained n1" in undrained.stdout
    assert again.exit_code == ExitCode.USAGE
    assert again.stderr.startswith("infermesh: error: ")
    assert "n1" in again.stderr
    assert "Traceback" not in again.output


async def test_models_pin_unpin_and_load_unload_an_adapter_with_its_events(
    cli: click.Group, vllm_agent: Agent, pki: Path
) -> None:
    ops, viewer = Operator(cli, vllm_agent, pki, "ops"), Operator(cli, vllm_agent, pki, "grafana")
    await wait_for_model(viewer)

    pinned = await ops("models", "pin", MODEL, "n1", "--min-replicas", "1")
    table = await viewer("models", "list")
    loaded = await ops("models", "load", "sql-lora", "--node", "n1", "--source", "/ad/sql")
    described = await viewer.json("models", "describe", MODEL)
    unloaded = await ops.json("models", "unload", "sql-lora", "--node", "n1")
    unpinned = await ops("models", "unpin", MODEL)
    events = await viewer("events", "--json", "--kind", "model")

    assert pinned.exit_code == 0, pinned.output
    assert f"pinned {MODEL} to n1, at least 1 loaded" in pinned.stdout
    assert table.stdout.splitlines()[1].split() == [MODEL, "1", "1", "n1", "(min", "1)"]
    assert loaded.exit_code == 0, loaded.output
    assert "sql-lora" in loaded.stdout
    assert isinstance(described, dict)
    assert described["pinned_nodes"] == ["n1"]
    assert isinstance(unloaded, dict)
    assert (unloaded["node"], unloaded["model"]) == ("n1", "sql-lora")
    assert unpinned.exit_code == 0
    actions = [
        (event["action"], event["subject"]) for event in map(json.loads, events.stdout.splitlines())
    ]
    assert ("loaded", "sql-lora") in actions
    assert ("unloaded", "sql-lora") in actions
    assert actions.index(("loaded", "sql-lora")) < actions.index(("unloaded", "sql-lora"))


async def test_an_admin_sets_a_policy_file_and_reads_it_back(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    admin = Operator(cli, agent, pki, "alice")
    policy_file = workdir / "policy.toml"
    policy_file.write_text(
        '[pins.llama]\nnodes = ["n1"]\n\n[quotas.acme]\nrequests_per_s = 50\n'
        '\n[acls.grafana]\nrole = "operator"\n'
    )

    applied = await admin("policy", "set", "--file", str(policy_file))
    one = await admin("policy", "set", "scoring", "fast", "--value", '{"model": "llama"}')
    entries = await admin("policy", "list", "quotas")
    document = await admin.json("policy", "get")
    deleted = await admin("policy", "delete", "quotas", "acme")
    missing = await admin("policy", "delete", "quotas", "acme")

    assert applied.exit_code == 0, applied.output
    assert applied.stdout.splitlines() == [
        "set pins/llama (policy revision 1)",
        "set quotas/acme (policy revision 2)",
        "set acls/grafana (policy revision 3)",
    ]
    assert one.exit_code == 0
    quota_row = entries.stdout.splitlines()[1].split()
    assert quota_row == ["quotas", "acme", '{"requests_per_s":', "50.0}"]
    assert isinstance(document, dict)
    assert document["revision"] == 4
    assert document["pins"] == {"llama": {"nodes": ["n1"], "min_replicas": 0}}
    assert deleted.exit_code == 0
    assert "deleted quotas/acme (policy revision 5)" in deleted.stdout
    assert missing.exit_code == ExitCode.USAGE
    assert "acme" in missing.stderr


async def test_a_refused_entry_stops_a_policy_file_naming_the_field(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    admin = Operator(cli, agent, pki, "alice")
    policy_file = workdir / "policy.json"
    policy_file.write_text('{"scoring": {"fast": {"model": "llama", "max_waiting": -1}}}')
    bad_toml = workdir / "bad.toml"
    bad_toml.write_text("[pins.llama\n")

    invalid = await admin("policy", "set", "--file", str(policy_file))
    unparsable = await admin("policy", "set", "--file", str(bad_toml))
    server_refused = await admin("policy", "set", "pins", "llama", "--value", '{"nodes": []}')

    assert invalid.exit_code == ExitCode.USAGE
    assert str(policy_file) in invalid.stderr
    assert "scoring['fast'].max_waiting" in invalid.stderr
    assert unparsable.exit_code == ExitCode.USAGE
    assert f"the file {bad_toml} is not valid TOML" in unparsable.stderr
    assert server_refused.exit_code == ExitCode.USAGE
    assert "nodes: must not be empty" in server_refused.stderr
    assert (await agent.policy.get()).revision == 0


async def test_a_viewer_setting_policy_is_refused_with_exit_4(
    cli: click.Group, agent: Agent, pki: Path
) -> None:
    viewer = Operator(cli, agent, pki, "grafana")

    refused = await viewer("policy", "set", "quotas", "acme", "--value", '{"concurrent": 1}')

    assert refused.exit_code == ExitCode.REFUSED
    assert "grafana has role viewer, which may not call SetPolicy" in refused.stderr
    assert str(pki / "grafana.pem") in refused.stderr


async def test_an_unknown_node_or_model_exits_3(cli: click.Group, agent: Agent, pki: Path) -> None:
    viewer = Operator(cli, agent, pki, "grafana")

    node = await viewer("nodes", "describe", "gpu-9")
    model = await viewer("models", "describe", "mistral")

    assert node.exit_code == model.exit_code == ExitCode.NOT_FOUND
    assert "node 'gpu-9' is not known to n1" in node.stderr
    assert "mistral" in model.stderr


async def test_certificates_from_another_ca_are_refused_with_exit_4(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    other = workdir / "other"
    foreign_client = [
        "--ca",
        str(pki / "ca.pem"),
        "--cert",
        str(other / "mallory.pem"),
        "--key",
        str(other / "mallory-key.pem"),
    ]
    untrusted_agent = ["--ca", str(other / "ca.pem"), *tls_args(pki, "alice")[2:]]

    refused = await invoke(cli, ["policy", "get", "--endpoint", endpoint(agent), *foreign_client])
    distrusted = await invoke(
        cli, ["policy", "get", "--endpoint", endpoint(agent), *untrusted_agent]
    )

    assert refused.exit_code == ExitCode.REFUSED
    assert f"refused this certificate ({other / 'mallory.pem'})" in refused.stderr
    assert distrusted.exit_code == ExitCode.REFUSED
    assert f"is not trusted by CA {other / 'ca.pem'}" in distrusted.stderr


async def test_an_unreachable_agent_exits_5_and_a_missing_key_file_exits_2(
    cli: click.Group, pki: Path
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    address = f"127.0.0.1:{port}"

    unreachable = await invoke(cli, ["nodes", "list", "--endpoint", address, *tls_args(pki, "ops")])
    no_key = await invoke(
        cli,
        ["nodes", "list", "--endpoint", address, *tls_args(pki, "ops")[:4], "--key", "/no/key"],
    )

    assert unreachable.exit_code == ExitCode.UNREACHABLE
    assert f"cannot reach the agent at {address} (connection refused)" in unreachable.stderr
    assert "is control.listen set on that agent" in unreachable.stderr
    assert no_key.exit_code == ExitCode.USAGE
    assert "cannot read the key /no/key" in no_key.stderr


async def test_a_profile_file_supplies_the_endpoint_and_certificates(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    profile_file = pki / "cli.toml"  # relative paths resolve against the file's directory
    profile_file.write_text(
        'default_profile = "lab"\n[profiles.lab]\n'
        f'endpoint = "{endpoint(agent)}"\nca = "ca.pem"\ncert = "ops.pem"\nkey = "ops-key.pem"\n'
    )

    drained = await invoke(
        cli, ["nodes", "drain", "n1", "--json"], env={"INFERMESH_CLI_CONFIG": str(profile_file)}
    )
    no_endpoint = await invoke(cli, ["nodes", "list"])

    assert drained.exit_code == 0, drained.output
    assert json.loads(drained.stdout)["policy"]["drains"]["n1"]["reason"] == ""
    assert no_endpoint.exit_code == ExitCode.USAGE
    assert "no agent endpoint: pass --endpoint HOST:PORT" in no_endpoint.stderr


async def test_events_show_a_drain_as_a_table_and_resume_after_a_seq(
    cli: click.Group, agent: Agent, pki: Path
) -> None:
    ops = Operator(cli, agent, pki, "ops")
    await ops("nodes", "drain", "n1", "--reason", "maintenance")
    await ops("nodes", "undrain", "n1")

    table = await ops("events", "--kind", "drain")
    lines = await ops("events", "--kind", "drain", "--json")
    drained, undrained = (json.loads(line) for line in lines.stdout.splitlines())
    after = await ops("events", "--kind", "drain", "--json", "--after", str(drained["seq"]))

    assert table.exit_code == 0, table.output
    rows = [line.split() for line in table.stdout.splitlines()]
    assert rows[0] == ["SEQ", "TIME", "KIND", "ACTION", "SUBJECT", "NODE", "MESSAGE"]
    assert [row[3:6] for row in rows[1:]] == [
        ["drain", "drained", "n1"],
        ["drain", "undrained", "n1"],
    ]
    assert (drained["action"], drained["subject"]) == ("drained", "n1")
    assert [json.loads(line)["seq"] for line in after.stdout.splitlines()] == [undrained["seq"]]


async def test_events_follow_prints_each_new_event_as_it_happens_until_ctrl_c(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    ops = Operator(cli, agent, pki, "ops")
    argv = [
        *infermesh_command(),
        *("events", "--follow", "--kind", "drain", "--endpoint", endpoint(agent)),
        *tls_args(pki, "ops"),
    ]
    env = {**os.environ, "XDG_CONFIG_HOME": str(workdir / "none")}
    async with await anyio.open_process(argv, env=env) as process:
        assert process.stdout is not None
        lines = LineReader(process.stdout)
        header = await lines.next()
        await ops("nodes", "drain", "n1", "--reason", "live")
        drained = await lines.next()
        # The stream is open now: the next event can only come live.
        await ops("nodes", "undrain", "n1")
        undrained = await lines.next()
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(DEADLINE_S):
            code = await process.wait()
            assert process.stderr is not None
            errors = b"".join([chunk async for chunk in process.stderr]).decode()

    assert header.split() == ["SEQ", "TIME", "KIND", "ACTION", "SUBJECT", "NODE", "MESSAGE"]
    assert drained.split()[3:6] == ["drain", "drained", "n1"]
    assert undrained.split()[3:6] == ["drain", "undrained", "n1"]
    assert code == 130  # as a shell reports Ctrl-C
    assert errors == ""  # no traceback


class LineReader:
    """Lines of a subprocess's output as they arrive, each within the test deadline."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        with anyio.fail_after(CLI_START_S):
            while b"\n" not in self._buffer:
                self._buffer += await self._stream.receive()
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


async def test_a_policy_file_stops_at_the_first_refused_entry_saying_what_was_set(
    cli: click.Group, agent: Agent, pki: Path, workdir: Path
) -> None:
    admin = Operator(cli, agent, pki, "alice")
    policy_file = workdir / "policy.toml"
    # The first entry takes alice's admin role away, so the agent refuses the second.
    policy_file.write_text(
        '[acls.alice]\nrole = "viewer"\n\n[quotas.acme]\nrequests_per_s = 5\n'
        "\n[quotas.other]\nrequests_per_s = 5\n"
    )

    result = await admin("policy", "set", "--file", str(policy_file))

    assert result.exit_code == ExitCode.REFUSED
    assert result.stdout == "set acls/alice (policy revision 1)\n"
    assert result.stderr.startswith(f"infermesh: error: quotas/acme from the file {policy_file}:")
    assert "alice has role viewer, which may not call SetPolicy" in result.stderr
    assert "(1 of 3 entries were set before it)" in result.stderr
    assert (await agent.policy.get()).revision == 1

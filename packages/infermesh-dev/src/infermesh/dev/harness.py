"""A local mesh of real processes: emulated vLLM and Triton servers, optionally an emulated
dcgm-exporter for their GPUs, one agent and one router.

Writes one TOML config into a temporary directory, starts each process with its log in that
directory, waits for each to be ready against a deadline, and tears everything down on exit or
signal. A failure names the process and shows its last log lines. With a `GossipSpec` the agent
joins a gossip mesh (several nodes: cluster.py). Never routes or scores itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import aiohttp
import attrs

from infermesh.dev.profiles import DEFAULT_MODEL, get_profile

__all__ = [
    "REPLICA_KINDS",
    "GossipSpec",
    "LocalMesh",
    "ManagedProcess",
    "MeshSpec",
    "MeshStartError",
    "ReplicaSpec",
    "RunningReplica",
    "dcgm_argv",
    "emulated_gpu_uuid",
    "emulator_argv",
    "free_gossip_port",
    "free_port",
    "infermesh_command",
    "mesh_spec",
    "render_config",
    "run_until_interrupted",
]

LOG_TAIL_LINES = 20
SCORING_SERVICE = "infermesh.v1.Scoring"
REPLICA_KINDS = ("vllm", "triton")
"""The emulators a replica can be: `infermesh dev vllm` or `infermesh dev triton`."""
TRITON_MODEL = "simple"
"""A model every emulated Triton serves (its repository loads all models at start)."""


class MeshStartError(Exception):
    """A mesh process failed to start or become ready; the message carries its log tail."""

    def __init__(self, message: str, *, process: str = "", log_tail: Sequence[str] = ()) -> None:
        self.process = process
        self.log_tail = tuple(log_tail)
        text = message
        if log_tail:
            text += f"\n--- last {len(log_tail)} log lines of {process} ---\n" + "\n".join(log_tail)
        super().__init__(text)


@attrs.frozen
class ReplicaSpec:
    """One emulated runtime: its profile, name, port (0: any free port) and `kind` — `vllm`
    (an OpenAI server, `infermesh dev vllm`) or `triton` (KServe v2 HTTP and gRPC plus Triton's
    metrics port, `infermesh dev triton`; the agent runs it as `kind = "triton"`)."""

    profile: str
    name: str
    port: int = 0
    """The vLLM port or Triton's HTTP port; Triton's gRPC and metrics ports are picked free."""
    extra_args: tuple[str, ...] = ()
    """More `infermesh dev vllm` / `infermesh dev triton` flags, e.g. `("--max-num-seqs", "4")`."""
    gpus: tuple[str, ...] = ()
    """UUIDs of the GPUs this replica runs on (its `[[runtimes]] gpus`), e.g. emulated ones.
    Empty with `MeshSpec(dcgm=True)`: the replica gets its own emulated GPU."""
    kind: str = "vllm"

    def __attrs_post_init__(self) -> None:
        get_profile(self.profile)  # fail early on a typo
        if self.kind not in REPLICA_KINDS:
            raise ValueError(
                f"replica {self.name!r}: kind must be one of {', '.join(REPLICA_KINDS)}, "
                f"got {self.kind!r}"
            )


GossipValue = str | float | bool


@attrs.frozen
class GossipSpec:
    """The agent's `[gossip]` table: its port, seeds, key file and any other keys."""

    port: int = 0
    """UDP and TCP port on 127.0.0.1 (0: a free one, picked before the agent starts)."""
    seeds: tuple[str, ...] = ()
    key_file: Path | None = None
    """The mesh's key file; None gossips in plaintext (`insecure = true`)."""
    options: tuple[tuple[str, GossipValue], ...] = ()
    """More `[gossip]` keys, e.g. `(("probe_interval_s", 0.2),)`."""


@attrs.frozen
class MeshSpec:
    """What to start: the replicas, the model they serve, and the router's port."""

    replicas: tuple[ReplicaSpec, ...]
    model: str = DEFAULT_MODEL
    router_port: int = 0
    node_id: str = "dev-node"
    poll_interval_s: float = 0.5
    log_level: str = "info"
    ready_timeout_s: float = 60.0
    start_agent: bool = True
    start_router: bool = True
    extra_config: str = ""
    """TOML appended to the generated config (e.g. a `[scoring.weights]` table)."""
    env: tuple[tuple[str, str], ...] = ()
    """Extra environment variables for the agent and router processes."""
    gossip: GossipSpec | None = None
    """Join the agent to a gossip mesh (None: a standalone node)."""
    dcgm: bool = False
    """Start an emulated dcgm-exporter (`infermesh dev dcgm`) with one GPU per replica that
    names none, map each replica to its GPU (`[[runtimes]] gpus`, and Triton's `gpu_uuid`), let
    a GPU's state set its replicas' speed, and have the agent read it (`[[gpus]] kind = "dcgm"`)."""

    def __attrs_post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a mesh needs at least one replica")
        names = [replica.name for replica in self.replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {names}")
        if self.start_router and not self.start_agent:
            raise ValueError("the router needs the agent")


def mesh_spec(
    *,
    replicas: int,
    profiles: Sequence[str],
    model: str = DEFAULT_MODEL,
    router_port: int = 0,
    log_level: str = "info",
    ready_timeout_s: float = 60.0,
    tritons: int = 0,
    dcgm: bool = False,
) -> MeshSpec:
    """`replicas` vLLM emulators cycling through `profiles`, named `<profile>-<index>`, then
    `tritons` Triton emulators named `triton-<index>` (same profiles); `dcgm` as in MeshSpec."""
    if not profiles:
        raise ValueError("at least one profile is required")
    if replicas < 0 or tritons < 0 or replicas + tritons < 1:
        raise ValueError(
            f"a mesh needs at least one replica, got {replicas} vLLM and {tritons} Triton"
        )
    specs = tuple(
        ReplicaSpec(profile=profiles[i % len(profiles)], name=f"{profiles[i % len(profiles)]}-{i}")
        for i in range(replicas)
    ) + tuple(
        ReplicaSpec(profile=profiles[i % len(profiles)], name=f"triton-{i}", kind="triton")
        for i in range(tritons)
    )
    return MeshSpec(
        replicas=specs,
        model=model,
        router_port=router_port,
        log_level=log_level,
        ready_timeout_s=ready_timeout_s,
        dcgm=dcgm,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_gossip_port(host: str = "127.0.0.1") -> int:
    """A port that was free for both TCP and UDP a moment ago (gossip uses both)."""
    while True:
        port = free_port(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port


def infermesh_command() -> list[str]:
    """How to run this environment's `infermesh` CLI: its console script, else via python -c."""
    script = Path(sys.executable).with_name("infermesh")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from infermesh.core.cli import main; main()"]


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid TOML basic string


def _toml_value(value: GossipValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    return repr(float(value))


def render_gossip(gossip: GossipSpec, port: int) -> list[str]:
    """The `[gossip]` table of a node whose agent gossips on 127.0.0.1:`port`."""
    lines = [
        "[gossip]",
        "enabled = true",
        f'bind = "127.0.0.1:{port}"',
        f"seeds = [{', '.join(_toml_str(seed) for seed in gossip.seeds)}]",
    ]
    if gossip.key_file is None:
        lines.append("insecure = true")
    else:
        lines.append(f"key_file = {_toml_str(str(gossip.key_file))}")
    lines += [f"{key} = {_toml_value(value)}" for key, value in gossip.options]
    return lines


@attrs.frozen
class RunningReplica:
    """A replica with its resolved ports (Triton: HTTP `port`, `grpc_port`, `metrics_port`) and
    the GPUs it runs on."""

    spec: ReplicaSpec
    port: int
    grpc_port: int = 0
    metrics_port: int = 0
    gpus: tuple[str, ...] = ()
    """`spec.gpus`, or the emulated GPU the mesh gave it (`MeshSpec.dcgm`)."""

    @property
    def url(self) -> str:
        """Base URL: vLLM's OpenAI server or Triton's KServe v2 HTTP."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def grpc_target(self) -> str:
        """Triton's gRPC `host:port` ('' for vLLM)."""
        return f"127.0.0.1:{self.grpc_port}" if self.grpc_port else ""

    @property
    def metrics_url(self) -> str:
        """Where the runtime's metrics are (vLLM: `/metrics` on its port)."""
        if self.metrics_port:
            return f"http://127.0.0.1:{self.metrics_port}/metrics"
        return f"{self.url}/metrics"

    @property
    def health_url(self) -> str:
        return f"{self.url}/v2/health/ready" if self.kind == "triton" else f"{self.url}/health"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def profile(self) -> str:
        return self.spec.profile


def render_config(
    spec: MeshSpec,
    replicas: Sequence[RunningReplica],
    *,
    socket_path: Path,
    agent_metrics_port: int,
    router_port: int,
    gossip_port: int = 0,
    router_grpc_port: int = 0,
    dcgm_url: str = "",
) -> str:
    """The mesh's TOML config: node, agent, router (KServe gRPC ingress on `router_grpc_port`
    when not 0), one `[[runtimes]]` per replica, `[[gpus]] kind = "dcgm"` reading `dcgm_url`
    when given, and `[gossip]` when the spec has one (on `gossip_port`)."""
    lines = [
        "# Generated by infermesh dev: a local mesh of emulated runtimes.",
        "[node]",
        f"id = {_toml_str(spec.node_id)}",
        "",
        "[agent]",
        f"socket = {_toml_str(str(socket_path))}",
        f'metrics_listen = "127.0.0.1:{agent_metrics_port}"',
        "",
        "[router]",
        f'listen = "127.0.0.1:{router_port}"',
        f"agent = {_toml_str('unix://' + str(socket_path))}",
        *([f'grpc_listen = "127.0.0.1:{router_grpc_port}"'] if router_grpc_port else []),
        "",
        "[logging]",
        f"level = {_toml_str(spec.log_level)}",
        'format = "json"',
    ]
    for replica in replicas:
        lines += [
            "",
            "[[runtimes]]",
            f"kind = {_toml_str(replica.kind)}",
            f"name = {_toml_str(replica.name)}",
            f"url = {_toml_str(replica.url)}",
            f"poll_interval_s = {spec.poll_interval_s}",
        ]
        if replica.kind == "triton":
            lines.append(
                f"options = {{ metrics_url = {_toml_str(replica.metrics_url)}, "
                f"grpc_url = {_toml_str(replica.grpc_target)} }}"
            )
        if replica.gpus:
            lines.append(f"gpus = [{', '.join(_toml_str(u) for u in replica.gpus)}]")
    if dcgm_url:
        lines += [
            "",
            "[[gpus]]",
            'kind = "dcgm"',
            f"url = {_toml_str(dcgm_url)}",
            f"poll_interval_s = {spec.poll_interval_s}",
        ]
    if spec.gossip is not None:
        lines += ["", *render_gossip(spec.gossip, gossip_port or spec.gossip.port)]
    if spec.extra_config:
        lines += ["", spec.extra_config.strip()]
    return "\n".join(lines) + "\n"


def emulated_gpu_uuid(node_id: str, replica: str) -> str:
    """The UUID of the emulated GPU a `MeshSpec(dcgm=True)` mesh gives a replica (stable for a
    node id and replica name, so a config or a test can name it)."""
    return f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'infermesh-dev/{node_id}/{replica}')}"


def _running_replica(spec: MeshSpec, replica: ReplicaSpec) -> RunningReplica:
    gpus = replica.gpus
    if not gpus and spec.dcgm:
        gpus = (emulated_gpu_uuid(spec.node_id, replica.name),)
    triton = replica.kind == "triton"
    return RunningReplica(
        spec=replica,
        port=replica.port or free_port(),
        grpc_port=free_port() if triton else 0,
        metrics_port=free_port() if triton else 0,
        gpus=gpus,
    )


def emulator_argv(
    cli: Sequence[str], replica: RunningReplica, *, model: str, index: int
) -> list[str]:
    """The command line of one replica's emulator (`infermesh dev vllm|triton ...`)."""
    if replica.kind == "triton":
        gpu = replica.gpus[0].split("/")[0] if replica.gpus else ""
        return [
            *cli,
            "dev",
            "triton",
            "--http-port",
            str(replica.port),
            "--grpc-port",
            str(replica.grpc_port),
            "--metrics-port",
            str(replica.metrics_port),
            "--profile",
            replica.profile,
            "--seed",
            str(index),
            *(["--gpu-uuid", gpu] if gpu else []),
            *replica.spec.extra_args,
        ]
    return [
        *cli,
        "dev",
        "vllm",
        "--port",
        str(replica.port),
        "--model",
        model,
        "--profile",
        replica.profile,
        "--replica-tag",
        replica.name,
        "--seed",
        str(index),
        *replica.spec.extra_args,
    ]


def dcgm_argv(
    cli: Sequence[str], replicas: Sequence[RunningReplica], *, port: int, node_id: str
) -> list[str]:
    """`infermesh dev dcgm` with one GPU per distinct UUID the replicas run on, each replica
    named on its GPU so that a throttled GPU slows it down."""
    uuids = list(dict.fromkeys(gpu.split("/")[0] for r in replicas for gpu in r.gpus))
    argv = [*cli, "dev", "dcgm", "--port", str(port), "--gpus", str(max(1, len(uuids)))]
    argv += ["--hostname", node_id]
    for gpu in uuids:
        argv += ["--uuid", gpu]
    for replica in replicas:
        for gpu in dict.fromkeys(g.split("/")[0] for g in replica.gpus):
            argv += ["--replica", f"{gpu}={replica.url}"]
    return argv


@attrs.define
class ManagedProcess:
    """A child process with its log file."""

    name: str
    argv: list[str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return text.splitlines()[-lines:]

    async def start(self, env: dict[str, str]) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                # Own process group: a terminal's Ctrl-C reaches only the harness, which then
                # stops the children in order.
                start_new_session=True,
            )

    async def stop(self, grace_s: float) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def failure(self, what: str) -> MeshStartError:
        code = self.returncode
        status = f"exited with code {code}" if code is not None else "is still running"
        return MeshStartError(
            f"{self.name} {what} ({status}; log: {self.log_path})",
            process=self.name,
            log_tail=self.log_tail(),
        )


class LocalMesh:
    """Starts a `MeshSpec` as real processes; use as `async with LocalMesh(spec) as mesh:`."""

    def __init__(self, spec: MeshSpec, workdir: Path | None = None, *, keep_workdir: bool = False):
        self.spec = spec
        self._own_workdir = workdir is None
        self.keep_workdir = keep_workdir
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="infermesh-mesh-"))
        self.socket_path = self.workdir / "agent.sock"
        self.config_path = self.workdir / "infermesh.toml"
        self.replicas = [_running_replica(spec, r) for r in spec.replicas]
        self.router_port = spec.router_port or free_port()
        self.router_grpc_port = free_port() if any(r.kind == "triton" for r in self.replicas) else 0
        """The router's KServe gRPC ingress (`router.grpc_listen`), when a replica is Triton."""
        self.dcgm_port = free_port() if spec.dcgm else 0
        self.agent_metrics_port = free_port()
        self.gossip_port = 0
        if spec.gossip is not None:
            self.gossip_port = spec.gossip.port or free_gossip_port()
        self.processes: list[ManagedProcess] = []
        self._env: dict[str, str] = {}

    @property
    def router_url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    @property
    def agent_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_metrics_port}/metrics"

    @property
    def agent_http_url(self) -> str:
        """Base URL of the agent's HTTP server (/metrics, /gossip/members)."""
        return f"http://127.0.0.1:{self.agent_metrics_port}"

    @property
    def router_grpc_target(self) -> str:
        """`127.0.0.1:port` of the router's KServe v2 gRPC ingress ('' without Triton replicas)."""
        return f"127.0.0.1:{self.router_grpc_port}" if self.router_grpc_port else ""

    @property
    def dcgm_url(self) -> str:
        """Base URL of the emulated dcgm-exporter ('' unless `MeshSpec.dcgm`): `/metrics`,
        `/control/gpus[/{uuid}]`."""
        return f"http://127.0.0.1:{self.dcgm_port}" if self.dcgm_port else ""

    @property
    def gossip_address(self) -> str:
        """`127.0.0.1:port` of the agent's gossip socket ('' without gossip)."""
        return f"127.0.0.1:{self.gossip_port}" if self.gossip_port else ""

    async def __aenter__(self) -> LocalMesh:
        try:
            await self.start()
        except BaseException as exc:
            if isinstance(exc, MeshStartError):
                self.keep_workdir = True  # its logs explain the failure
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        """Start emulators, then the agent, then the router, each ready before the next."""
        deadline = time.monotonic() + self.spec.ready_timeout_s
        self.config_path.write_text(
            render_config(
                self.spec,
                self.replicas,
                socket_path=self.socket_path,
                agent_metrics_port=self.agent_metrics_port,
                router_port=self.router_port,
                gossip_port=self.gossip_port,
                router_grpc_port=self.router_grpc_port,
                dcgm_url=f"{self.dcgm_url}/metrics" if self.dcgm_url else "",
            )
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("INFERMESH_CONFIG", None)
        cli = infermesh_command()
        emulators = [
            ManagedProcess(
                name=f"emulator {replica.name}",
                argv=emulator_argv(cli, replica, model=self.spec.model, index=index),
                log_path=self.workdir / f"{replica.kind}-{replica.name}.log",
            )
            for index, replica in enumerate(self.replicas)
        ]
        waits = [
            (replica.health_url, process)
            for replica, process in zip(self.replicas, emulators, strict=True)
        ]
        if self.dcgm_port:
            dcgm = ManagedProcess(
                name="emulator dcgm-exporter",
                argv=dcgm_argv(cli, self.replicas, port=self.dcgm_port, node_id=self.spec.node_id),
                log_path=self.workdir / "dcgm-exporter.log",
            )
            emulators.append(dcgm)
            waits.append((f"{self.dcgm_url}/health", dcgm))
        for process in emulators:
            await self._launch(process, env)
        await asyncio.gather(*(wait_http_ok(url, process, deadline) for url, process in waits))
        if not self.spec.start_agent:
            return
        self._env = {**env, **dict(self.spec.env)}
        await self._start_agent(deadline)
        if not self.spec.start_router:
            return
        router = ManagedProcess(
            name="router",
            argv=[*cli, "router", "run", *self._common_args()],
            log_path=self.workdir / "router.log",
        )
        await self._launch(router, self._env)
        await wait_http_ok(f"{self.router_url}/health", router, deadline)
        await wait_model_listed(self.router_url, self.first_model, router, deadline)

    @property
    def first_model(self) -> str:
        """The model the router must list before the mesh counts as ready: the vLLM model, or
        Triton's `simple` in a mesh of Triton replicas only."""
        if any(replica.kind == "vllm" for replica in self.replicas):
            return self.spec.model
        return TRITON_MODEL

    def _common_args(self) -> list[str]:
        return [
            "--config",
            str(self.config_path),
            "--log-level",
            self.spec.log_level,
            "--log-format",
            "json",
        ]

    async def _start_agent(self, deadline: float) -> None:
        agent = ManagedProcess(
            name="agent",
            argv=[*infermesh_command(), "agent", "run", *self._common_args()],
            log_path=self.workdir / "agent.log",
        )
        await self._launch(agent, self._env)
        await wait_grpc_serving(f"unix://{self.socket_path}", agent, deadline)

    @property
    def agent(self) -> ManagedProcess:
        """The running agent process."""
        found = [p for p in self.processes if p.name == "agent"]
        if not found:
            raise LookupError("this mesh has no agent process")
        return found[-1]

    async def kill_agent(self) -> None:
        """SIGKILL the agent (no goodbye to the gossip mesh) and wait until it is gone."""
        agent = self.agent
        if agent.process is not None and agent.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                agent.process.kill()
            await agent.process.wait()
        self.processes.remove(agent)

    async def restart_agent(self) -> None:
        """Start the agent again with the same config (after `kill_agent`) and wait until ready."""
        if any(p.name == "agent" and p.returncode is None for p in self.processes):
            raise RuntimeError("the agent is still running; kill_agent() first")
        await self._start_agent(time.monotonic() + self.spec.ready_timeout_s)

    async def _launch(self, process: ManagedProcess, env: dict[str, str]) -> None:
        self.processes.append(process)
        try:
            await process.start(env)
        except OSError as exc:
            raise MeshStartError(
                f"cannot start {process.name} ({process.argv[0]}): {exc}"
            ) from None

    # ------------------------------------------------------------------ run / stop

    def exited(self) -> ManagedProcess | None:
        """The first process that has exited, if any."""
        return next((p for p in self.processes if p.returncode is not None), None)

    async def stop(self, grace_s: float = 6.0) -> None:
        """Stop the router, then the agent, then the emulators; remove the workdir if ours."""
        by_tier: dict[str, list[ManagedProcess]] = {"router": [], "agent": [], "emulator": []}
        for process in self.processes:
            tier = process.name.split()[0]
            by_tier.setdefault(tier, []).append(process)
        for tier in ("router", "agent", "emulator"):
            await asyncio.gather(*(p.stop(grace_s) for p in by_tier.get(tier, [])))
        self.processes.clear()
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


# ---------------------------------------------------------------------- readiness


async def wait_http_ok(url: str, process: ManagedProcess, deadline: float) -> None:
    """Wait until GET `url` answers 200, failing fast if `process` exits."""
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        last_error = "no answer yet"
        while True:
            if process.returncode is not None:
                raise process.failure(f"exited before {url} answered")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
                    last_error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last_error = type(exc).__name__
            if time.monotonic() >= deadline:
                raise process.failure(f"not ready: GET {url} -> {last_error}")
            await asyncio.sleep(0.1)


async def wait_grpc_serving(target: str, process: ManagedProcess, deadline: float) -> None:
    """Wait until the agent's gRPC health says the Scoring service is SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    last_error = "no answer yet"
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.returncode is not None:
                raise process.failure("exited before its gRPC health answered")
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=SCORING_SERVICE), timeout=1.0
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_error = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                last_error = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() >= deadline:
                raise process.failure(f"not ready: gRPC health on {target} -> {last_error}")
            await asyncio.sleep(0.1)


async def wait_model_listed(
    router_url: str, model: str, process: ManagedProcess, deadline: float
) -> None:
    """Wait until the router lists `model` (the agent has scraped at least one replica)."""
    url = f"{router_url}/v1/models"
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        last = "no answer yet"
        while True:
            if process.returncode is not None:
                raise process.failure(f"exited before {url} listed {model}")
            try:
                async with session.get(url) as resp:
                    body = await resp.json(content_type=None) if resp.status == 200 else None
                    ids = [card.get("id") for card in (body or {}).get("data", [])]
                    if model in ids:
                        return
                    last = f"HTTP {resp.status}, models {ids}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                last = type(exc).__name__
            if time.monotonic() >= deadline:
                raise process.failure(f"never listed {model!r} at {url} ({last})")
            await asyncio.sleep(0.2)


# ---------------------------------------------------------------------- `infermesh dev up`


async def run_until_interrupted(spec: MeshSpec, echo: Callable[[str], None] = print) -> int:
    """Start the mesh, print where it is, and run until SIGINT/SIGTERM or a process dies.

    Returns the exit code: 0 after a signal, 1 when a mesh process exited on its own.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with LocalMesh(spec) as mesh:
            echo(f"router: {mesh.router_url}  (OpenAI API: {mesh.router_url}/v1)")
            if mesh.router_grpc_target:
                echo(f"router KServe v2: {mesh.router_url}/v2  gRPC {mesh.router_grpc_target}")
            for replica in mesh.replicas:
                gpus = f"  gpu={','.join(replica.gpus)}" if replica.gpus else ""
                if replica.kind == "triton":
                    echo(
                        f"triton {replica.name}: {replica.url}  gRPC {replica.grpc_target}  "
                        f"metrics {replica.metrics_url}  profile={replica.profile}{gpus}"
                    )
                else:
                    echo(f"vllm {replica.name}: {replica.url}  profile={replica.profile}{gpus}")
            if mesh.dcgm_url:
                echo(
                    f"dcgm-exporter: {mesh.dcgm_url}/metrics  "
                    f"(POST {mesh.dcgm_url}/control/gpus/<uuid> to throttle, heat up, XID)"
                )
            echo(f"agent: unix://{mesh.socket_path}  metrics {mesh.agent_metrics_url}")
            echo(f"config and logs: {mesh.workdir}")
            echo("Ctrl-C stops the mesh.")
            while not stop.is_set():
                dead = mesh.exited()
                if dead is not None:
                    echo(str(dead.failure("stopped unexpectedly")))
                    return 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            echo("stopping the mesh ...")
            return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

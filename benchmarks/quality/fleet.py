"""One cold emulated fleet per routing mode: emulators, one degraded GPU, and the mode's router.

Every mode gets fresh emulator processes (same profiles, same degraded replica), so no mode
inherits prefix-cache contents or queues from the one before. Unless told not to, the fleet also
has an emulated dcgm-exporter (`infermesh dev dcgm`), as a GPU node runs one: one GPU per
replica with its card's real model name, and the degraded replica's GPU in the `hot` state
(92 °C, `sw_thermal_slowdown`, SM clock at its share of the top clock), which is also what slows
that emulator down. The router in front is either the InferMesh agent + router (`infermesh
router run`, local scoring; the agent reads the exporter through `[[gpus]] kind = "dcgm"` and
each runtime's `gpus`) or `vllm-router` with one of its policies (which has no way to read GPU
telemetry). Starting anything that fails raises `StartError` with the child's log tail.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.overhead import tools
from benchmarks.overhead.loadgen import chat_body
from benchmarks.overhead.mesh import (
    CHAT_PATH,
    HOST,
    Mesh,
    start_infermesh,
    wait_chat_ok,
)
from benchmarks.overhead.processes import ProcessGroup, StartError, free_port
from benchmarks.overhead.report import INFERMESH, INFERMESH_AGENT
from infermesh.dev.profiles import get_profile

__all__ = [
    "PROFILES",
    "VLLM_ROUTER_POLICIES",
    "Fleet",
    "Replica",
    "RouterUp",
    "fetch_request_logs",
    "mode_name",
    "parse_fleet",
    "start_fleet",
    "start_router",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("h100", "a100", "a10", "l4")
VLLM_ROUTER_POLICIES = ("round_robin", "power_of_two", "cache_aware")
_VLLM_ROUTER_PREFIX = "vllm-router "


@dataclass(frozen=True, slots=True)
class Replica:
    """One emulated vLLM replica: its GPU profile and the share of that profile's speed it runs
    at (1.0 healthy; below 1 a throttled or degraded GPU)."""

    profile: str
    speed: float = 1.0

    @property
    def label(self) -> str:
        return self.profile if self.speed == 1.0 else f"{self.profile}@{self.speed:g}"


def parse_fleet(text: str) -> tuple[Replica, ...]:
    """`h100,a100,a10,h100@0.25`: one replica per item, `@F` runs it at F of its speed."""
    replicas: list[Replica] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        profile, _, speed_text = item.partition("@")
        if profile not in PROFILES:
            raise argparse.ArgumentTypeError(
                f"unknown profile {profile!r} in {text!r}; profiles: {', '.join(PROFILES)}"
            )
        try:
            speed = float(speed_text) if speed_text else 1.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad speed {speed_text!r} in {item!r}") from None
        if not 0.0 < speed <= 1.0:
            raise argparse.ArgumentTypeError(f"speed must be in (0, 1], got {speed:g} in {item!r}")
        replicas.append(Replica(profile, speed))
    if len(replicas) < 2:
        raise argparse.ArgumentTypeError(f"a fleet needs at least 2 replicas, got {text!r}")
    return tuple(replicas)


def mode_name(router: str) -> str:
    """`infermesh` or a vllm-router policy name -> the mode's display name."""
    return router if router == INFERMESH else _VLLM_ROUTER_PREFIX + router


def _infermesh_argv() -> list[str]:
    return [sys.executable, "-c", "from infermesh.core.cli import main; main()"]


def fetch_request_logs(bases: Sequence[str]) -> list[list[dict[str, object]]]:
    """Each emulator's dev-only `GET /dev/requests` (its finished requests: queue wait,
    prefill, cache hit); an emulator that does not answer gives an empty list."""
    logs: list[list[dict[str, object]]] = []
    for base in bases:
        try:
            with urllib.request.urlopen(base + "/dev/requests", timeout=10.0) as response:
                body = json.loads(response.read())
        except (OSError, ValueError):
            logs.append([])
            continue
        entries = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(entries, list):
            entries = []
        logs.append([entry for entry in entries if isinstance(entry, dict)])
    return logs


def _set_speed(base: str, factor: float) -> None:
    body = json.dumps({"factor": factor}).encode()
    request = urllib.request.Request(
        base + "/dev/speed", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5.0) as response:
        response.read()


@dataclass(frozen=True, slots=True)
class Fleet:
    """A started fleet: the emulators' base URLs and, with GPU telemetry, the emulated
    dcgm-exporter's `/metrics` URL and each replica's GPU UUID (same order as `bases`)."""

    bases: tuple[str, ...]
    dcgm_metrics_url: str = ""
    gpu_uuids: tuple[str, ...] = ()


NODE_ID = "bench"
DEGRADED_STATE = "hot"
"""What the degraded replica's GPU reports: the state the simulator's degraded GPUs model
(`infermesh.dev.sim.route.gpu_telemetry`): 92 °C, `sw_thermal_slowdown`, a low SM clock."""


def _json_request(url: str, body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10.0) as response:
        return json.loads(response.read())


def start_gpu_telemetry(
    procs: ProcessGroup,
    replicas: Sequence[Replica],
    bases: Sequence[str],
    args: argparse.Namespace,
) -> Fleet:
    """An emulated dcgm-exporter with one GPU per replica (its profile's model name), each
    replica named on its GPU; a degraded replica's GPU is put in the `hot` state at the
    replica's speed, which slows the replica through its `/dev/speed`."""
    port = free_port()
    argv = [*_infermesh_argv(), "dev", "dcgm", "--host", HOST, "--port", str(port)]
    argv += ["--gpus", str(len(replicas)), "--hostname", NODE_ID, "--log-level", "warning"]
    for index, (replica, base) in enumerate(zip(replicas, bases, strict=True)):
        argv += ["--model-name", get_profile(replica.profile).gpu_name]
        argv += ["--replica", f"{index}={base}"]
    child = procs.start("dcgm-exporter", argv)
    url = f"http://{HOST}:{port}"
    procs.wait_http(child, f"{url}/health", timeout_s=args.start_timeout)
    listed = _json_request(f"{url}/control/gpus")
    gpus = listed.get("gpus") if isinstance(listed, dict) else listed
    if not isinstance(gpus, list) or len(gpus) != len(replicas):
        raise StartError(f"the dcgm emulator listed {gpus!r}, expected {len(replicas)} GPUs")
    by_index = {int(gpu["index"]): str(gpu["uuid"]) for gpu in gpus}
    uuids = tuple(by_index[i] for i in range(len(replicas)))
    for uuid, replica in zip(uuids, replicas, strict=True):
        if replica.speed != 1.0:
            body = {"state": DEGRADED_STATE, "factor": replica.speed}
            _json_request(f"{url}/control/gpus/{uuid}", body)
    return Fleet(bases=tuple(bases), dcgm_metrics_url=f"{url}/metrics", gpu_uuids=uuids)


def start_fleet(
    procs: ProcessGroup, replicas: Sequence[Replica], args: argparse.Namespace
) -> Fleet:
    """One emulator per replica (tagged `r<i>-<label>` in response ids), plus the emulated
    dcgm-exporter unless `args.no_gpu_telemetry` (then a degraded replica is slowed through its
    `/dev/speed` directly and no GPU reports anything)."""
    bases = _start_emulators(procs, replicas, args)
    if not getattr(args, "no_gpu_telemetry", False):
        return start_gpu_telemetry(procs, replicas, bases, args)
    for base, replica in zip(bases, replicas, strict=True):
        if replica.speed != 1.0:
            _set_speed(base, replica.speed)
    return Fleet(bases=tuple(bases))


def _start_emulators(
    procs: ProcessGroup, replicas: Sequence[Replica], args: argparse.Namespace
) -> list[str]:
    """Start one emulator per replica (tagged `r<i>-<label>` in response ids); their base URLs."""
    started = []
    for index, replica in enumerate(replicas):
        port = free_port()
        argv = [
            *_infermesh_argv(),
            "dev",
            "vllm",
            "--host",
            HOST,
            "--port",
            str(port),
            "--model",
            args.model,
            "--profile",
            replica.profile,
            "--seed",
            str(index),
            "--replica-tag",
            f"r{index}-{replica.label.replace('@', 'x')}",
            "--enable-prompt-tokens-details",
        ]
        child = procs.start(f"emulator-{index}-{replica.profile}", argv)
        started.append((child, f"http://{HOST}:{port}", replica))
    for child, base, _ in started:
        procs.wait_http(child, f"{base}/health", timeout_s=args.start_timeout)
    return [base for _, base, _ in started]


@dataclass(frozen=True, slots=True)
class RouterUp:
    base_url: str
    detail: str


def write_agent_config(path: Path, fleet: Fleet) -> Path:
    """The agent's (and router's) config: each emulator a `[[runtimes]]` (with its GPU under
    `gpus` when the fleet has telemetry), the exporter a `[[gpus]] kind = "dcgm"` source."""
    lines = [
        "[node]",
        f'id = "{NODE_ID}"',
        "",
        "[agent]",
        f'socket = "{path.parent / "agent.sock"}"',
        f'metrics_listen = "{HOST}:{free_port()}"',
        "",
        "[logging]",
        'level = "warning"',
        'format = "json"',
    ]
    for index, base in enumerate(fleet.bases):
        lines += ["", "[[runtimes]]", 'kind = "vllm"', f'url = "{base}"', "poll_interval_s = 0.5"]
        if fleet.gpu_uuids:
            lines.append(f'gpus = ["{fleet.gpu_uuids[index]}"]')
    if fleet.dcgm_metrics_url:
        lines += ["", "[[gpus]]", 'kind = "dcgm"', f'url = "{fleet.dcgm_metrics_url}"']
        lines.append("poll_interval_s = 0.5")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_router(
    procs: ProcessGroup,
    router: str,
    fleet: Fleet,
    args: argparse.Namespace,
    work_dir: Path,
) -> RouterUp:
    """Start `router` (`infermesh` or a vllm-router policy) over `fleet`; ready when a chat
    request through it answers 200."""
    probe = chat_body(args.model, stream=False, max_tokens=1)
    bases = fleet.bases
    if router == INFERMESH:
        mesh = Mesh(urls={}, skipped={}, details={})
        config = write_agent_config(work_dir / "infermesh.toml", fleet)
        start_infermesh(procs, args, config, mesh, skip={INFERMESH_AGENT})
        if INFERMESH not in mesh.urls:
            raise StartError(mesh.skipped.get(INFERMESH, "the InferMesh router did not start"))
        url = mesh.urls[INFERMESH][0]
        return RouterUp(url.removesuffix(CHAT_PATH), mesh.details[INFERMESH])
    if router not in VLLM_ROUTER_POLICIES:
        raise ValueError(f"unknown router {router!r}")
    found = tools.find_vllm_router(
        REPO_ROOT / ".bench", args.vllm_router, install=not args.no_install
    )
    if found.argv is None:
        raise StartError(found.detail)
    port = free_port()
    argv = [
        *found.argv,
        "--host",
        HOST,
        "--port",
        str(port),
        "--policy",
        router,
        "--worker-urls",
        *bases,
        "--log-level",
        "warning",
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(free_port()),
    ]
    child = procs.start(f"vllm-router-{router}", argv)
    base = f"http://{HOST}:{port}"
    wait_chat_ok(child, base + CHAT_PATH, probe, args.start_timeout)
    version = tools.vllm_router_version(found.argv[0]) or "version unknown"
    return RouterUp(base, f"{version}; {found.detail}; --policy {router}")

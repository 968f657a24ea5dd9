"""One cold emulated fleet per routing mode: emulators, one degraded GPU, and the mode's router.

Every mode gets fresh emulator processes (same profiles, same degraded replica), so no mode
inherits prefix-cache contents or queues from the one before. The router in front is either the
InferMesh agent + router (`infermesh router run`, local scoring) or `vllm-router` with one of its
policies. Starting anything that fails raises `StartError` with the child's log tail.
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
    write_config,
)
from benchmarks.overhead.processes import ProcessGroup, StartError, free_port
from benchmarks.overhead.report import INFERMESH, INFERMESH_AGENT

__all__ = [
    "PROFILES",
    "VLLM_ROUTER_POLICIES",
    "Replica",
    "RouterUp",
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


def _set_speed(base: str, factor: float) -> None:
    body = json.dumps({"factor": factor}).encode()
    request = urllib.request.Request(
        base + "/dev/speed", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5.0) as response:
        response.read()


def start_fleet(
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
        ]
        child = procs.start(f"emulator-{index}-{replica.profile}", argv)
        started.append((child, f"http://{HOST}:{port}", replica))
    for child, base, replica in started:
        procs.wait_http(child, f"{base}/health", timeout_s=args.start_timeout)
        if replica.speed != 1.0:
            _set_speed(base, replica.speed)
    return [base for _, base, _ in started]


@dataclass(frozen=True, slots=True)
class RouterUp:
    base_url: str
    detail: str


def start_router(
    procs: ProcessGroup,
    router: str,
    bases: Sequence[str],
    args: argparse.Namespace,
    work_dir: Path,
) -> RouterUp:
    """Start `router` (`infermesh` or a vllm-router policy) over `bases`; ready when a chat
    request through it answers 200."""
    probe = chat_body(args.model, stream=False, max_tokens=1)
    if router == INFERMESH:
        mesh = Mesh(urls={}, skipped={}, details={})
        config = write_config(work_dir / "infermesh.toml", args, bases)
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

"""The servers of one router-overhead run: emulators, agent, routers, vllm-router, variants.

Starts each as a child of a `ProcessGroup`, waits until a real chat request through it answers
200, and records which URL each mode's load goes to. A mode that cannot start is recorded in
`Mesh.skipped` with the reason (its log tail included); only the emulators are required.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.overhead import tools
from benchmarks.overhead.loadgen import chat_body
from benchmarks.overhead.processes import ChildProcess, ProcessGroup, StartError, free_port
from benchmarks.overhead.report import DIRECT, INFERMESH, INFERMESH_AGENT, VLLM_ROUTER

__all__ = ["ALL_VARIANTS", "Mesh", "Variant", "build_mesh", "parse_variants"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHAT_PATH = "/v1/chat/completions"
HOST = "127.0.0.1"

SERVERS = ("uvicorn", "granian", "hypercorn")
UPSTREAMS = ("builtin", "aiohttp", "httpx", "httpx2")
"""`builtin` is the router's own `openai-http` client; the others are benchmark plugins."""
ALL_VARIANTS = (
    "uvicorn+builtin",
    "granian+builtin",
    "hypercorn+builtin",
    "uvicorn+aiohttp",
    "uvicorn+httpx",
    "uvicorn+httpx2",
)


@dataclass(frozen=True, slots=True)
class Variant:
    """The InferMesh router app served by `server` with upstream client `upstream`."""

    server: str
    upstream: str

    @property
    def mode(self) -> str:
        return f"{INFERMESH} {self.server}+{self.upstream}"

    @property
    def needs(self) -> tuple[str, ...]:
        """Packages this variant needs beyond the workspace environment."""
        extra = {"granian": ("granian",), "httpx": ("httpx",)}
        return extra.get(self.server, ()) + extra.get(self.upstream, ())

    @classmethod
    def parse(cls, text: str) -> Variant:
        server, _, upstream = text.partition("+")
        if server not in SERVERS or upstream not in UPSTREAMS:
            raise argparse.ArgumentTypeError(
                f"unknown variant {text!r}: expected SERVER+UPSTREAM with SERVER in "
                f"{'/'.join(SERVERS)} and UPSTREAM in {'/'.join(UPSTREAMS)}"
            )
        return cls(server, upstream)


def parse_variants(text: str) -> tuple[Variant, ...]:
    if text == "default":
        return ()
    if text == "all":
        return tuple(Variant.parse(name) for name in ALL_VARIANTS)
    return tuple(Variant.parse(name.strip()) for name in text.split(",") if name.strip())


# --------------------------------------------------------------------------- readiness


def _post_ok(url: str, body: bytes) -> tuple[bool, str]:
    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5.0) as response:
            payload = response.read()
            return response.status == 200, f"HTTP {response.status}: {payload[:200]!r}"
    except urllib.error.HTTPError as exc:
        return False, f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except (urllib.error.URLError, OSError) as exc:
        return False, str(exc)


def wait_chat_ok(child: ChildProcess, url: str, body: bytes, timeout_s: float) -> None:
    """Wait until a real chat request through `child` answers 200 (routes are known)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if child.popen.poll() is not None:
            break
        ok, last = _post_ok(url, body)
        if ok:
            return
        time.sleep(0.2)
    raise StartError(
        f"{child.name} did not answer {url} with 200 within {timeout_s:.0f} s "
        f"(last: {last}; exit status {child.popen.poll()}).\n"
        f"command: {' '.join(child.argv)}\n--- {child.log_path} ---\n{child.log_tail()}"
    )


# --------------------------------------------------------------------------- the mesh


@dataclass
class Mesh:
    """Every server of one run, keyed by mode: the chat URLs the load goes to."""

    urls: dict[str, list[str]]
    skipped: dict[str, str]
    details: dict[str, str]
    proxies: dict[str, ChildProcess] = field(default_factory=dict)
    """The process each routed mode goes through (its router or vllm-router)."""
    emulators: list[ChildProcess] = field(default_factory=list)
    agent: ChildProcess | None = None


def _infermesh_argv() -> list[str]:
    """`infermesh` with this interpreter (the workspace environment)."""
    return [sys.executable, "-c", "from infermesh.core.cli import main; main()"]


def start_emulators(procs: ProcessGroup, args: argparse.Namespace, mesh: Mesh) -> list[str]:
    bases: list[str] = []
    children: list[tuple[ChildProcess, str]] = []
    for index in range(args.emulators):
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
            "instant",
            "--seed",
            str(index),
        ]
        child = procs.start(f"emulator-{index}", argv)
        base = f"http://{HOST}:{port}"
        children.append((child, base))
        mesh.emulators.append(child)
        bases.append(base)
    for child, base in children:
        procs.wait_http(child, f"{base}/health", timeout_s=args.start_timeout)
    return bases


def write_config(path: Path, args: argparse.Namespace, bases: Sequence[str]) -> Path:
    """The agent's (and routers') config: the emulators as runtimes, quiet logs, own ports."""
    lines = [
        "[node]",
        'id = "bench"',
        "",
        "[agent]",
        f'socket = "{path.parent / "agent.sock"}"',
        f'metrics_listen = "{HOST}:{free_port()}"',
        "",
        "[logging]",
        'level = "warning"',
        'format = "json"',
    ]
    for base in bases:
        lines += ["", "[[runtimes]]", 'kind = "vllm"', f'url = "{base}"', "poll_interval_s = 0.5"]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_infermesh(
    procs: ProcessGroup, args: argparse.Namespace, config: Path, mesh: Mesh, skip: set[str]
) -> str | None:
    """The agent and the product router (`infermesh router run`, local scoring by default),
    plus the same router with `--scoring agent`; returns the agent target."""
    socket_path = config.parent / "agent.sock"
    agent = procs.start("agent", [*_infermesh_argv(), "agent", "run", "--config", str(config)])
    mesh.agent = agent
    deadline = time.monotonic() + args.start_timeout
    while not socket_path.exists():
        if agent.popen.poll() is not None or time.monotonic() > deadline:
            mesh.skipped[INFERMESH] = (
                f"agent did not create {socket_path} (exit status {agent.popen.poll()}).\n"
                f"--- {agent.log_path} ---\n{agent.log_tail()}"
            )
            return None
        time.sleep(0.1)
    target = f"unix://{socket_path}"
    versions = tools.package_versions(
        [sys.executable], ["uvicorn", "uvloop", "httptools", "grpcio"]
    )
    for mode, scoring, detail in (
        (INFERMESH, [], "infermesh router run (defaults: local scoring, builtin transport)"),
        (INFERMESH_AGENT, ["--scoring", "agent"], "infermesh router run --scoring agent"),
    ):
        if mode in skip:
            mesh.skipped[mode] = "--skip"
            continue
        port = free_port()
        argv = [*_infermesh_argv(), "router", "run", "--config", str(config)]
        argv += ["--listen", f"{HOST}:{port}", "--agent", target, *scoring]
        router = procs.start("router" if mode == INFERMESH else "router-agent-scoring", argv)
        base = f"http://{HOST}:{port}"
        try:
            procs.wait_http(router, f"{base}/health", timeout_s=args.start_timeout)
            wait_chat_ok(router, base + CHAT_PATH, _probe_body(args), args.start_timeout)
        except StartError as exc:
            mesh.skipped[mode] = str(exc)
            procs.stop(router)
            continue
        mesh.urls[mode] = [base + CHAT_PATH]
        mesh.proxies[mode] = router
        mesh.details[mode] = f"{detail}; {versions}"
    return target


def start_vllm_router(
    procs: ProcessGroup, args: argparse.Namespace, bases: Sequence[str], mesh: Mesh
) -> None:
    bench_dir = REPO_ROOT / ".bench"
    found = tools.find_vllm_router(bench_dir, args.vllm_router, install=not args.no_install)
    if found.argv is None:
        mesh.skipped[VLLM_ROUTER] = found.detail
        return
    port = free_port()
    prometheus_port = free_port()
    argv = [
        *found.argv,
        "--host",
        HOST,
        "--port",
        str(port),
        "--policy",
        "round_robin",
        "--worker-urls",
        *bases,
        "--log-level",
        "warning",
        "--prometheus-host",
        HOST,
        "--prometheus-port",
        str(prometheus_port),
    ]
    child = procs.start(VLLM_ROUTER, argv)
    base = f"http://{HOST}:{port}"
    try:
        wait_chat_ok(child, base + CHAT_PATH, _probe_body(args), args.start_timeout)
    except StartError as exc:
        mesh.skipped[VLLM_ROUTER] = str(exc)
        return
    mesh.urls[VLLM_ROUTER] = [base + CHAT_PATH]
    mesh.proxies[VLLM_ROUTER] = child
    version = tools.vllm_router_version(found.argv[0]) or "version unknown"
    mesh.details[VLLM_ROUTER] = f"{version}; {found.detail}; --policy round_robin"


def start_variants(
    procs: ProcessGroup, args: argparse.Namespace, config: Path, target: str, mesh: Mesh
) -> None:
    """The router app under each requested ingress server / upstream client."""
    variants: tuple[Variant, ...] = args.variants
    # One Python per set of extra packages, so a missing granian does not skip httpx2 variants.
    pythons: dict[tuple[str, ...], tuple[tools.Found, str]] = {}
    for variant in variants:
        if variant.needs not in pythons:
            python = tools.variant_python(
                REPO_ROOT, install=not args.no_install, needs=variant.needs
            )
            versions = ""
            if python.argv is not None:
                packages = ["uvicorn", "granian", "aiohttp", "httpx", "httpx2"]
                versions = tools.package_versions(python.argv, packages) or "versions unknown"
            pythons[variant.needs] = (python, versions)
        python, versions = pythons[variant.needs]
        if python.argv is None:
            mesh.skipped[variant.mode] = python.detail
            continue
        port = free_port()
        argv = [
            *python.argv,
            "-m",
            "benchmarks.overhead.router_variant",
            "--config",
            str(config),
            "--listen",
            f"{HOST}:{port}",
            "--agent",
            target,
            "--server",
            variant.server,
            "--upstream",
            variant.upstream,
        ]
        child = procs.start(f"router-{variant.server}-{variant.upstream}", argv, cwd=REPO_ROOT)
        base = f"http://{HOST}:{port}"
        try:
            procs.wait_http(child, f"{base}/health", timeout_s=args.start_timeout)
            wait_chat_ok(child, base + CHAT_PATH, _probe_body(args), args.start_timeout)
        except StartError as exc:
            mesh.skipped[variant.mode] = str(exc)
            procs.stop(child)
            continue
        mesh.urls[variant.mode] = [base + CHAT_PATH]
        mesh.proxies[variant.mode] = child
        mesh.details[variant.mode] = f"{versions}; {python.detail}"


def _probe_body(args: argparse.Namespace) -> bytes:
    return chat_body(args.model, stream=False, max_tokens=1)


def build_mesh(procs: ProcessGroup, args: argparse.Namespace, work_dir: Path) -> Mesh:
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = skip - {INFERMESH, INFERMESH_AGENT, VLLM_ROUTER}
    if unknown:
        raise SystemExit(f"--skip: unknown mode(s) {', '.join(sorted(unknown))}")
    mesh = Mesh(urls={}, skipped={}, details={})
    print(f"starting {args.emulators} instant vLLM emulators ...", file=sys.stderr)
    bases = start_emulators(procs, args, mesh)
    mesh.urls[DIRECT] = [base + CHAT_PATH for base in bases]
    mesh.details[DIRECT] = "client round robin over the emulators"
    config = write_config(work_dir / "infermesh.toml", args, bases)
    target: str | None = None
    if INFERMESH in skip:
        mesh.skipped[INFERMESH] = "--skip"
    else:
        print("starting the InferMesh agent and router ...", file=sys.stderr)
        target = start_infermesh(procs, args, config, mesh, skip)
    if VLLM_ROUTER in skip:
        mesh.skipped[VLLM_ROUTER] = "--skip"
    else:
        print("starting vllm-router ...", file=sys.stderr)
        start_vllm_router(procs, args, bases, mesh)
    if args.variants:
        if target is None:
            for variant in args.variants:
                mesh.skipped[variant.mode] = "no InferMesh agent"
        else:
            print("starting the router variants ...", file=sys.stderr)
            start_variants(procs, args, config, target, mesh)
    return mesh

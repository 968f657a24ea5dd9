"""Router overhead: the same load direct to emulated vLLM, through InferMesh, through vllm-router.

Starts `--emulators` instant vLLM emulators, an InferMesh agent + router over them, and
vllm-router (PyPI, round_robin) over the same emulators, then drives each mode in turn with a
closed-loop load (fixed concurrency, small non-streaming and streaming chat requests) and prints
a table plus one JSON line (the last line of stdout). With `--variants all` it also serves the
InferMesh router app under granian and uvicorn, with aiohttp and httpx upstream clients.

    uv run python benchmarks/router_overhead.py [--repeats 3] [--variants all]

Every process it starts listens on 127.0.0.1 and is stopped on exit, Ctrl-C included. It never
asserts timings: it measures and reports. See docs/benchmarks.md for what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the `benchmarks` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.overhead import tools
from benchmarks.overhead.loadgen import LoadSpec, chat_body, run_load
from benchmarks.overhead.processes import (
    ChildProcess,
    ProcessGroup,
    StartError,
    cpu_seconds_by_group,
    free_port,
)
from benchmarks.overhead.report import (
    DIRECT,
    INFERMESH,
    VLLM_ROUTER,
    Phase,
    Sample,
    render_goals,
    render_json,
    render_table,
    rows_from_results,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHAT_PATH = "/v1/chat/completions"
HOST = "127.0.0.1"

SERVERS = ("uvicorn", "granian")
UPSTREAMS = ("aiohttp", "httpx", "httpx2")
ALL_VARIANTS = (
    "uvicorn+aiohttp",
    "granian+aiohttp",
    "uvicorn+httpx",
    "granian+httpx",
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


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--concurrency",
        type=positive_int,
        default=16,
        help="concurrent clients in the throughput phases",
    )
    parser.add_argument(
        "--latency-concurrency",
        type=int,
        default=1,
        help="concurrency of the latency phases (0 skips them)",
    )
    parser.add_argument(
        "--duration",
        type=positive_float,
        default=2.5,
        help="measured seconds per phase, mode and repeat",
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured seconds before each measured phase"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="also stop a measured phase after this many requests (0: no cap)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="repeats; every figure is the median over repeats",
    )
    parser.add_argument(
        "--emulators", type=positive_int, default=2, help="instant vLLM emulators behind every mode"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=8,
        help="max_tokens of each request (stream chunks per answer)",
    )
    parser.add_argument("--model", default="bench-model", help="model the emulators serve")
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default="default",
        metavar="default|all|LIST",
        help="extra InferMesh ingress/upstream variants: 'all' or a comma list "
        f"of {', '.join(ALL_VARIANTS)}",
    )
    parser.add_argument(
        "--skip",
        default="",
        metavar="MODES",
        help="comma list of modes to leave out: infermesh, vllm-router",
    )
    parser.add_argument(
        "--vllm-router",
        default=None,
        metavar="PATH",
        help="vllm-router executable (default: find it or install it in .bench/)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never install vllm-router, granian or httpx"
    )
    parser.add_argument(
        "--start-timeout",
        type=positive_float,
        default=60.0,
        help="seconds each server may take to become ready",
    )
    parser.add_argument(
        "--log-dir",
        default=None,
        help="keep the servers' logs here (default: a temporary directory)",
    )
    args = parser.parse_args(argv)
    if args.latency_concurrency < 0:
        parser.error("--latency-concurrency must be >= 0")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


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
    procs: ProcessGroup, args: argparse.Namespace, config: Path, mesh: Mesh
) -> str | None:
    """The agent and the product router (`infermesh router run`); returns the agent target."""
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
    port = free_port()
    router = procs.start(
        "router",
        [
            *_infermesh_argv(),
            "router",
            "run",
            "--config",
            str(config),
            "--listen",
            f"{HOST}:{port}",
            "--agent",
            target,
        ],
    )
    base = f"http://{HOST}:{port}"
    try:
        procs.wait_http(router, f"{base}/health", timeout_s=args.start_timeout)
        wait_chat_ok(router, base + CHAT_PATH, _probe_body(args), args.start_timeout)
    except StartError as exc:
        mesh.skipped[INFERMESH] = str(exc)
        return target
    mesh.urls[INFERMESH] = [base + CHAT_PATH]
    mesh.proxies[INFERMESH] = router
    versions = tools.package_versions(
        [sys.executable], ["uvicorn", "uvloop", "httptools", "aiohttp", "grpcio"]
    )
    mesh.details[INFERMESH] = f"infermesh router run (default server and transport); {versions}"
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
    unknown = skip - {INFERMESH, VLLM_ROUTER}
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
        target = start_infermesh(procs, args, config, mesh)
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


# --------------------------------------------------------------------------- measuring


def phases_of(args: argparse.Namespace) -> list[Phase]:
    phases = [
        Phase(stream=False, concurrency=args.concurrency),
        Phase(stream=True, concurrency=args.concurrency),
    ]
    if args.latency_concurrency:
        phases += [
            Phase(stream=False, concurrency=args.latency_concurrency),
            Phase(stream=True, concurrency=args.latency_concurrency),
        ]
    return phases


def cpu_roles(mesh: Mesh, mode: str) -> dict[str, list[int]]:
    """Process groups whose CPU time is charged to each role while `mode` is measured."""
    roles = {"emulators": [child.popen.pid for child in mesh.emulators]}
    if mesh.agent is not None:
        roles["agent"] = [mesh.agent.popen.pid]
    if mode in mesh.proxies:
        roles["proxy"] = [mesh.proxies[mode].popen.pid]
    return roles


def run_measured(runner: asyncio.Runner, spec: LoadSpec, roles: dict[str, list[int]]) -> Sample:
    """One load phase, with the CPU time each role spent on it shared out per request."""
    before = cpu_seconds_by_group()
    loadgen_before = time.process_time()
    result = runner.run(run_load(spec))
    loadgen_s = time.process_time() - loadgen_before
    after = cpu_seconds_by_group()
    completed = max(result.completed_total, 1)
    cpu_us: dict[str, float] = {"loadgen": loadgen_s / completed * 1e6}
    for role, groups in roles.items():
        if all(group in before and group in after for group in groups):
            spent_s = sum(after[group] - before[group] for group in groups)
            cpu_us[role] = spent_s / completed * 1e6
    return Sample(load=result, cpu_us_per_request=cpu_us)


def measure(mesh: Mesh, args: argparse.Namespace) -> dict[tuple[str, Phase], list[Sample]]:
    """Every mode under every phase, `repeats` times; modes rotate order between repeats."""
    modes = list(mesh.urls)
    phases = phases_of(args)
    results: dict[tuple[str, Phase], list[Sample]] = {
        (mode, phase): [] for phase in phases for mode in modes
    }
    bodies = {
        stream: chat_body(args.model, stream=stream, max_tokens=args.max_tokens)
        for stream in (False, True)
    }
    with _event_loop_runner() as runner:
        for repeat in range(args.repeats):
            shift = repeat % len(modes)
            order = modes[shift:] + modes[:shift]
            for phase in phases:
                for mode in order:
                    spec = LoadSpec(
                        urls=mesh.urls[mode],
                        body=bodies[phase.stream],
                        stream=phase.stream,
                        concurrency=phase.concurrency,
                        warmup_s=args.warmup,
                        duration_s=args.duration,
                        max_requests=args.max_requests,
                    )
                    sample = run_measured(runner, spec, cpu_roles(mesh, mode))
                    results[(mode, phase)].append(sample)
                    result = sample.load
                    print(
                        f"  repeat {repeat + 1}/{args.repeats} {phase.name:<10} {mode:<28} "
                        f"{result.throughput_rps:8.0f} req/s  p50 {result.latency_ms(50):6.2f} ms"
                        f"  errors {result.errors}",
                        file=sys.stderr,
                    )
    return results


@contextlib.contextmanager
def _event_loop_runner() -> Iterator[asyncio.Runner]:
    """The load generator's loop: uvloop when installed (less client overhead), else asyncio."""
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        yield runner


# --------------------------------------------------------------------------- main


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.log_dir:
            work_dir = Path(args.log_dir).resolve()
            work_dir.mkdir(parents=True, exist_ok=True)
        else:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="imbench-")))
        procs = stack.enter_context(ProcessGroup(work_dir))
        try:
            mesh = build_mesh(procs, args, work_dir)
        except StartError as exc:
            print(f"benchmark could not start: {exc}", file=sys.stderr)
            return 2
        for mode, reason in mesh.skipped.items():
            print(f"NOTE: {mode} not measured: {reason}", file=sys.stderr)
        print(f"measuring {', '.join(mesh.urls)} ...", file=sys.stderr)
        try:
            results = measure(mesh, args)
        except KeyboardInterrupt:
            print("interrupted; stopping servers", file=sys.stderr)
            return 130
    rows = rows_from_results(results)
    for row in rows:
        if row.errors:
            print(
                f"WARNING: {row.mode} {row.phase.name}: {row.errors} failed requests, first: "
                f"{row.first_error}",
                file=sys.stderr,
            )
    settings: dict[str, object] = {
        "concurrency": args.concurrency,
        "latency_concurrency": args.latency_concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "emulators": args.emulators,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "wall_s": round(time.monotonic() - started, 1),
        "modes": mesh.details,
    }
    print(render_table(rows))
    print(
        f"\n+p50/+p99: added over direct in the same phase; x vllm-router: req/s over "
        f"vllm-router's; medians of {args.repeats} repeats; {os.cpu_count()} CPUs shared by "
        f"the load generator and every server."
    )
    print(render_goals(rows))
    print(render_json(rows, settings=settings, skipped=mesh.skipped))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

"""Replica discovery on this machine's real /proc, with real child processes: a vLLM-shaped
server (its recorded /metrics and /v1/models pages) holding a listening socket, whose two
"tensor-parallel worker" children the fake NVML lists on two GPUs. The NVML adapter maps the
server's URL to both GPUs; an agent with that runtime (no `gpus` in the config) labels its
targets with them, so the worse GPU's throttling and an XID on either reach the target."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
import pytest
import structlog.testing

import infermesh.dcgm.plugin as dcgm_plugin
import infermesh.vllm.plugin as vllm_plugin
from infermesh.agent.daemon import Agent
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, GpuConfig, NodeConfig, RuntimeConfig
from infermesh.core.contracts import AdapterContext
from infermesh.core.model import ModelState, RequestFeatures
from infermesh.core.plugins import PluginHost
from infermesh.core.scoring.engine import Ranking
from infermesh.core.scoring.gpu_map import ReplicaGpus
from infermesh.dcgm.nvml import NvmlAdapter
from infermesh.dev.harness import free_port
from tests.dcgm.fake_nvml import H100, RTX, FakeNvml, a100_mig, consumer, h100
from tests.vllm.pages import MODEL, models_json, render_page

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(sys.platform != "linux", reason="replica discovery reads Linux's /proc"),
]

DEADLINE_S = 30.0

# Serves the pages named on its command line like a vLLM server, with two workers that live
# until it closes their stdin; prints "<port> <its pid> <worker pids>", then serves until its
# own stdin closes. Standard library only, so it starts fast on a loaded machine.
SERVER = """
import http.server, os, subprocess, sys, threading
pages = {
    "/metrics": (open(sys.argv[1], "rb").read(), "text/plain; version=0.0.4"),
    "/v1/models": (open(sys.argv[2], "rb").read(), "application/json"),
    "/health": (b"", "text/plain"),
}
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body, kind = pages.get(self.path.split("?")[0], (None, ""))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
workers = [
    subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    for _ in range(2)
]
print(server.server_port, os.getpid(), *(w.pid for w in workers), flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
server.shutdown()
for w in workers:
    w.stdin.close()
    w.wait()
"""


def context(**options: object) -> AdapterContext:
    return AdapterContext(node="n1", name="nvml0", url="", options=options)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short enough for a Unix socket
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def tp_server(folder: Path) -> AsyncIterator[tuple[str, int, list[int]]]:
    """(URL, server pid, worker pids) of a running SERVER."""
    (folder / "metrics").write_text(render_page())
    (folder / "models").write_text(models_json())
    argv = [sys.executable, "-c", SERVER, str(folder / "metrics"), str(folder / "models")]
    async with await anyio.open_process(argv) as process:
        assert process.stdout is not None
        assert process.stdin is not None
        with anyio.fail_after(DEADLINE_S):
            line = b""
            while not line.endswith(b"\n"):
                line += await process.stdout.receive()
        port, server_pid, *workers = map(int, line.split())
        try:
            yield f"http://127.0.0.1:{port}", server_pid, workers
        finally:
            await process.stdin.aclose()
            with anyio.fail_after(DEADLINE_S):
                await process.wait()


async def test_a_server_is_mapped_to_the_gpus_of_its_worker_children(socket_dir: Path) -> None:
    async with tp_server(socket_dir) as (base_url, server_pid, (worker_0, worker_1)):
        fake = FakeNvml([h100(processes=[worker_0]), consumer(), a100_mig()])
        fake.gpus[1].processes = [worker_1]
        fake.gpus[2].migs[0].processes = [4_000_000]  # someone else's, on a MIG instance
        adapter = NvmlAdapter(context(), nvml=fake)
        try:
            url = f"{base_url}/v1"
            absent = f"http://127.0.0.1:{free_port()}"
            found = await adapter.replica_gpus([url, absent])
        finally:
            await adapter.aclose()
    assert found[url] == ReplicaGpus(gpus=tuple(sorted([H100, RTX])), pids=(server_pid,))
    assert found[absent].gpus == ()
    assert "nothing on this machine listens on" in found[absent].reason


async def test_gpus_whose_processes_nvml_cannot_list_are_logged_once() -> None:
    gpu = h100(processes=pynvml.NVMLError_NoPermission)
    gpu.graphics = gpu.processes
    adapter = NvmlAdapter(context(), nvml=FakeNvml([gpu]))
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):
                await adapter.replica_gpus(["http://127.0.0.1:1"])
    finally:
        await adapter.aclose()
    said = [e for e in logs if e["event"] == "NVML does not list this GPU's processes"]
    assert [(e["gpu"], e["reason"]) for e in said] == [
        (H100, "compute: no permission; graphics: no permission")
    ]


# --------------------------------------------------------------------------- the agent


async def wait_for(what: str, check: Callable[[], bool]) -> None:
    """Poll `check` until it holds; fail naming `what` after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {DEADLINE_S:g} s waiting for {what}")
        await anyio.sleep(0.05)


def target_of(agent: Agent, url: str) -> ModelState | None:
    return next((s for s in agent.store.model_states() if s.key.endpoint == url), None)


def agent_config(url: str, socket_dir: Path) -> Config:
    """A vLLM runtime without `gpus`, and the nvml GPU source discovering every 0.2 s."""
    return Config(
        node=NodeConfig(id="n1"),
        agent=AgentConfig(
            socket=str(socket_dir / "agent.sock"), metrics_listen="", shutdown_grace_s=2.0
        ),
        runtimes=[RuntimeConfig(kind="vllm", url=url, poll_interval_s=0.1)],
        gpus=[
            GpuConfig(
                kind="nvml", poll_interval_s=0.1, options={"replica_discovery_interval_s": 0.2}
            )
        ],
    )


async def test_the_agent_maps_an_unconfigured_runtime_and_its_gpus_faults_reach_it(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeNvml([h100(), consumer()])  # the H100 throttles (sw_power_cap), the RTX does not
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # what the nvml adapter imports
    host = PluginHost.load(
        entry_point_list=[],
        extra=[("core", core_plugin), ("vllm", vllm_plugin), ("dcgm", dcgm_plugin)],
    )
    async with tp_server(socket_dir) as (url, _, (worker_0, worker_1)):
        fake.gpus[0].processes = [worker_0]
        fake.gpus[1].processes = [worker_1]
        agent = Agent(agent_config(url, socket_dir), host)
        async with anyio.create_task_group() as tg:
            await tg.start(partial(agent.run, handle_signals=False))
            try:
                await wait_for("the target labelled with both GPUs", lambda: mapped(agent, url))
                state = target_of(agent, url)
                assert state is not None
                assert state.labels.gpu_uuid == f"{RTX},{H100}"
                assert {g.key.gpu_uuid for g in agent.store.gpus_for(state)} == {H100, RTX}
                (target,) = rank(agent).targets
                reasons = {r.scorer: r.reason for r in target.reasons}
                assert reasons["gpu_health"] == (
                    f"GPU {H100} throttled sw_power_cap x0.85 (worst of 2 GPUs)"
                )
                fake.xid(1, 79)
                await wait_for("the target excluded", lambda: not rank(agent).targets)
                (excluded,) = rank(agent).excluded
                assert f"GPU {RTX} unhealthy: XID 79 reported" in str(excluded)
            finally:
                agent.request_stop()


def mapped(agent: Agent, url: str) -> bool:
    state = target_of(agent, url)
    return state is not None and state.labels.gpu_uuid != ""


def rank(agent: Agent) -> Ranking:
    return agent.engine.rank(RequestFeatures(model=MODEL), time.time())

"""A real Prometheus scrapes a local mesh with the example config's jobs, and answers queries.

The server is Debian's `prometheus` package: the one on PATH, else the package downloaded once
with `apt-get download` (no root needed) and unpacked with `dpkg-deb -x` into
`<repo>/.cache/prometheus/`, reused by later runs. Where neither works the test is skipped with
the reason. The mesh's agent and router are scraped every second; the test waits (with
deadlines) for both jobs to be up and for the router's request counter to show the requests it
sent, then runs every expression of the Grafana dashboard and of the documented alerts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from infermesh.dev.harness import LocalMesh, ReplicaSpec, free_port

from .conftest import MODEL, spec
from .dashboard_support import (
    OBSERVABILITY,
    ROOT,
    SCRAPE_CONFIG,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    load_dashboard,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CACHE = ROOT / ".cache" / "prometheus"
DOWNLOAD_TIMEOUT_S = 180.0
WAIT_S = 20.0
GRAFANA_VALUES = {"$__rate_interval": "30s", "$__interval": "15s", "$model": ".*", "$node": ".*"}
REQUESTS = 3


def _run(argv: list[str], cwd: Path) -> str:
    """Run a setup command; its failure (or absence) skips the test with the reason."""
    try:
        done = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot install prometheus: {' '.join(argv)}: {exc}")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.skip(f"cannot install prometheus: {' '.join(argv)} failed: {' | '.join(tail)}")
    return done.stdout


def prometheus_binaries() -> tuple[Path, Path | None]:
    """(prometheus, promtool or None): from PATH, else from the Debian package in CACHE,
    downloading and unpacking it the first time."""
    on_path = shutil.which("prometheus")
    if on_path:
        promtool = shutil.which("promtool")
        return Path(on_path), Path(promtool) if promtool else None
    unpacked = CACHE / "root" / "usr" / "bin"
    if not (unpacked / "prometheus").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="download-") as scratch:
            work = Path(scratch)
            _run(["apt-get", "download", "prometheus"], work)
            packages = sorted(work.glob("prometheus_*.deb"))
            if not packages:
                pytest.skip("cannot install prometheus: apt-get download left no .deb")
            _run(["dpkg-deb", "-x", str(packages[-1]), str(work / "root")], work)
            with contextlib.suppress(FileExistsError, OSError):
                (work / "root").rename(CACHE / "root")  # another run may have won the race
    tool = unpacked / "promtool"
    return unpacked / "prometheus", tool if tool.is_file() else None


def job_names(config: str) -> list[str]:
    """The `job_name`s of a Prometheus config, in order."""
    return re.findall(r"^\s*-\s*job_name:\s*([\w.-]+)\s*$", config, re.M)


def live_config(jobs: dict[str, str]) -> str:
    """A config scraping each job's one target every second (JSON is valid YAML)."""
    scrape_configs = [
        {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": [target]}]}
        for job, target in jobs.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": scrape_configs,
    }
    return json.dumps(config, indent=1)


def grafana_to_promql(expr: str) -> str:
    """A dashboard expression with its Grafana variables replaced by concrete values."""
    for variable, value in GRAFANA_VALUES.items():
        expr = expr.replace(variable, value)
    return expr


class PrometheusApi:
    """Instant queries against Prometheus's HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def query(self, promql: str) -> dict[str, Any]:
        """The JSON answer of /api/v1/query (`status` is `success` or `error`)."""
        async with self.session.get(f"{self.url}/api/v1/query", params={"query": promql}) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
            return answer

    async def vector(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """(labels, value) of each series of an instant vector; [] while the server is not
        ready yet."""
        try:
            answer = await self.query(promql)
        except (aiohttp.ClientError, ValueError):
            return []
        if answer.get("status") != "success":
            return []
        return [(item["metric"], float(item["value"][1])) for item in answer["data"]["result"]]


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await condition():
        if time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])  # noqa: ASYNC240
            pytest.fail(f"timed out after {WAIT_S:g} s waiting for {what}; prometheus log:\n{tail}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def running_prometheus(
    binary: Path, config: str, workdir: Path
) -> AsyncIterator[tuple[str, Path]]:
    """Prometheus on a free loopback port with its TSDB in `workdir`; yields (URL, log)."""
    config_path = workdir / "prometheus.yml"
    config_path.write_text(config)
    log = workdir / "prometheus.log"
    port = free_port()
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(binary),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--web.console.templates={workdir}",
            f"--web.console.libraries={workdir}",
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()


async def chat(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )


@pytest.fixture(scope="module")
def binaries() -> tuple[Path, Path | None]:
    return prometheus_binaries()


async def promtool_check(promtool: Path, *args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        str(promtool),
        "check",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, f"promtool check {' '.join(args)}:\n{output.decode()}"


async def test_the_example_config_and_the_documented_alerts_pass_promtool(
    binaries: tuple[Path, Path | None], tmp_path: Path
) -> None:
    _, promtool = binaries
    if promtool is None:
        pytest.skip("this prometheus installation has no promtool")
    await promtool_check(promtool, "config", str(SCRAPE_CONFIG))
    rules = tmp_path / "infermesh-alerts.yml"
    rules.write_text(alert_rules(OBSERVABILITY.read_text()))
    await promtool_check(promtool, "rules", str(rules))


async def test_prometheus_scrapes_the_mesh_and_runs_every_dashboard_query(
    binaries: tuple[Path, Path | None], tmp_path: Path
) -> None:
    binary, _ = binaries
    agent_job, router_job = job_names(SCRAPE_CONFIG.read_text())
    async with LocalMesh(spec(ReplicaSpec("h100", "fast"))) as mesh:
        jobs = {
            agent_job: f"127.0.0.1:{mesh.agent_metrics_port}",
            router_job: f"127.0.0.1:{mesh.router_port}",
        }
        async with (
            running_prometheus(binary, live_config(jobs), tmp_path) as (url, log),
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as session,
        ):
            api = PrometheusApi(session, url)

            async def both_up() -> bool:
                series = await api.vector(f'up{{job=~"{agent_job}|{router_job}"}} == 1')
                return {labels["job"] for labels, _ in series} == set(jobs)

            sent = (
                f'infermesh_router_requests_total{{job="{router_job}",route="chat",status="200"}}'
            )

            def counted(requests: int) -> Callable[[], Awaitable[bool]]:
                async def condition() -> bool:
                    return [value for _, value in await api.vector(sent)] == [float(requests)]

                return condition

            client = openai.AsyncOpenAI(base_url=f"{mesh.router_url}/v1", api_key="unused")
            try:
                # One request makes the series, so that Prometheus sees it rise afterwards (a
                # series first scraped at 3 has no rate).
                await chat(client)
                await wait_for(both_up, f"{agent_job} and {router_job} to be up", log)
                await wait_for(counted(1), f"{sent} == 1", log)
                for _ in range(REQUESTS):
                    await chat(client)
            finally:
                await client.close()
            await wait_for(counted(1 + REQUESTS), f"{sent} == {1 + REQUESTS}", log)

            async def rising() -> bool:
                return bool(await api.vector(f"sum(rate({sent}[30s])) > 0"))

            await wait_for(rising, f"sum(rate({sent}[30s])) > 0", log)
            (target,) = await api.vector(
                f'infermesh_agent_target_healthy{{job="{agent_job}"}} == 1'
            )
            assert target[0]["model"] == MODEL
            expressions = [*dashboard_expressions(load_dashboard())]
            expressions += alert_expressions(alert_rules(OBSERVABILITY.read_text()))
            failed = []
            for where, expr in expressions:
                answer = await api.query(grafana_to_promql(expr))
                if answer.get("status") != "success":
                    failed.append(f"{where}: {answer.get('error')} in {expr}")
            assert not failed, "Prometheus refused these expressions:\n" + "\n".join(failed)


def test_a_missing_installer_skips_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(pytest.skip.Exception, match="cannot install prometheus: no-such-apt"):
        _run(["no-such-apt", "download", "prometheus"], tmp_path)
    with pytest.raises(pytest.skip.Exception, match=r"failed: .*nope"):
        _run(["sh", "-c", "echo nope >&2; exit 3"], tmp_path)


def test_job_names_and_the_live_config() -> None:
    assert job_names(SCRAPE_CONFIG.read_text()) == ["infermesh-agent", "infermesh-router"]
    config = json.loads(live_config({"a": "127.0.0.1:1"}))
    assert config["global"]["scrape_interval"] == "1s"
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
    assert grafana_to_promql('rate(x{m=~"$model"}[$__rate_interval])') == 'rate(x{m=~".*"}[30s])'

"""`infermesh dev vllm`, `infermesh dev up` and `infermesh demo` as a user runs them."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest
from click.testing import CliRunner

from infermesh.dev.cli import demo_command, dev_group
from infermesh.dev.harness import free_port, infermesh_command

PROCESS_DEADLINE_S = 60.0


async def wait_healthy(url: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + PROCESS_DEADLINE_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            assert process.returncode is None, "the emulator exited before it was healthy"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, f"{url} never answered 200"
            await asyncio.sleep(0.1)


async def read_until(stream: asyncio.StreamReader, marker: str, output: list[str]) -> None:
    deadline = time.monotonic() + PROCESS_DEADLINE_S
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"never printed {marker!r}; got:\n" + "".join(output)
        line = (await asyncio.wait_for(stream.readline(), remaining)).decode()
        assert line, f"exited before printing {marker!r}; got:\n" + "".join(output)
        output.append(line)
        if marker in line:
            return


@pytest.mark.anyio
async def test_dev_vllm_serves_health_and_stops_on_sigterm() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "dev",
        "vllm",
        "--port",
        str(port),
        "--profile",
        "a10",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/health", process)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["vllm", "--port", "1", "--profile", "v100"], "'v100' is not one of"),
        (["vllm", "--profile", "a10"], "Missing option '--port'"),
        (
            ["vllm", "--port", "1", "--profile", "a10", "--max-model-len", "100000"],
            "cannot hold one sequence",
        ),
        (["vllm", "--port", "1", "--lora", "meta-llama/Llama-3.1-8B-Instruct"], "cannot share"),
        (["up", "--profiles", "h100,v100"], "unknown profile(s) 'v100'"),
        (["up", "--replicas", "0"], "--replicas and --triton are both 0"),
        (["up", "--triton", "-1"], "-1 is not in the range"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(dev_group, args)
    assert result.exit_code == 2
    assert message in result.output


def test_demo_refuses_a_bad_duration() -> None:
    result = CliRunner().invoke(demo_command, ["--duration", "0"])
    assert result.exit_code == 2
    assert "--duration" in result.output


@pytest.mark.integration
@pytest.mark.anyio
async def test_dev_up_routes_requests_and_stops_everything_on_ctrl_c() -> None:
    router_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "dev",
        "up",
        "--replicas",
        "2",
        "--port",
        str(router_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output: list[str] = []
    try:
        assert process.stdout is not None
        await read_until(process.stdout, "Ctrl-C stops the mesh.", output)
        replica_urls = [line.split()[2] for line in output if line.startswith("vllm ")]
        assert len(replica_urls) == 2
        body = {"model": "meta-llama/Llama-3.1-8B-Instruct", "prompt": "Hi", "max_tokens": 3}
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"http://127.0.0.1:{router_port}/v1/completions", json=body
            ) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 3
            process.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(process.wait(), 30) == 0
            for url in replica_urls:  # the emulators are gone too
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with session.get(f"{url}/health"):
                        pass
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.integration
@pytest.mark.anyio
async def test_demo_prints_where_requests_went() -> None:
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "demo",
        "--duration",
        "3",
        "--replicas",
        "2",
        "--concurrency",
        "4",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 100)
    text = stdout.decode()
    assert process.returncode == 0, text
    assert "Where requests went" in text
    assert "h100-0" in text
    assert "a100-1" in text
    assert "requests succeeded" in text


@pytest.mark.integration
@pytest.mark.anyio
async def test_demo_exits_1_showing_the_failing_process_log() -> None:
    # Without the agent plugin, `infermesh agent run` is not a command: the mesh cannot start.
    env = {**os.environ, "INFERMESH_PLUGINS_BLOCK": "agent"}
    process = await asyncio.create_subprocess_exec(
        *infermesh_command(),
        "demo",
        "--duration",
        "2",
        "--replicas",
        "1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 100)
    text = stdout.decode()
    assert process.returncode == 1, text
    assert "infermesh demo: agent exited before its gRPC health answered" in text
    assert "log lines of agent" in text
    assert "No such command 'agent'" in text

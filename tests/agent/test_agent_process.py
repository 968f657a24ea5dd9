"""`infermesh agent run` as a real process: state in, scores and /metrics out, clean SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import grpc
import pytest
from anyio.abc import Process
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infermesh.agent.api.server import unix_target
from infermesh.core.convert import model_delta_to_pb, request_features_to_pb
from infermesh.core.model import ModelStateDelta, RequestFeatures, TargetKey
from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc, state_pb2_grpc

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

KEY = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8001")
AGENT = [sys.executable, "-c", "from infermesh.core.cli import main; main()", "agent", "run"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))  # short: Unix socket path limit
    yield path
    shutil.rmtree(path, ignore_errors=True)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INFERMESH_")}


async def wait_for_log(log_path: Path, event: str, process: Process) -> dict[str, Any]:
    """The first JSON log line with `event`, waiting (with a deadline) for it to be written."""
    with anyio.fail_after(20):
        while True:
            text = await anyio.Path(log_path).read_text()
            for line in text.splitlines():
                if line.startswith("{") and json.loads(line).get("event") == event:
                    return dict(json.loads(line))
            if process.returncode is not None:
                raise AssertionError(f"agent exited with {process.returncode}:\n{text}")
            await anyio.sleep(0.05)


async def test_agent_process_scores_serves_metrics_and_stops_cleanly_on_sigterm(
    workdir: Path,
) -> None:
    socket_path = workdir / "sock" / "agent.sock"
    config = workdir / "agent.toml"
    config.write_text(
        f'[node]\nid = "n1"\n\n[agent]\nsocket = "{socket_path}"\n'
        'metrics_listen = "127.0.0.1:0"\nshutdown_grace_s = 3.0\n\n'
        "[scoring.weights]\nprefix = 5.0\n"
    )
    log_path = workdir / "agent.log"
    with log_path.open("wb") as log_file:
        process = await anyio.open_process(
            [*AGENT, "--config", str(config), "--log-format", "json"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    async with process:
        try:
            ready = await wait_for_log(log_path, "agent ready", process)
            assert ready["scorers"] == {
                "gpu_health": 2.0,
                "kv": 1.0,
                "net_penalty": 1.0,
                "prefix": 5.0,
                "queue": 2.0,
            }
            async with grpc.aio.insecure_channel(unix_target(socket_path)) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="infermesh.v1.Scoring")
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                changes = {"running": 2.0, "waiting": 1.0, "last_updated": time.time()}
                ack = await state_pb2_grpc.StateStub(channel).PushModelDeltas(
                    iter([model_delta_to_pb(ModelStateDelta(KEY, 1, changes))])
                )
                assert ack.applied == 1
                reply = await scoring_pb2_grpc.ScoringStub(channel).ScoreTargets(
                    scoring_pb2.ScoreTargetsRequest(
                        request=request_features_to_pb(RequestFeatures(model="llama")),
                        reserve=True,
                    )
                )
                assert [t.target_id for t in reply.targets] == [KEY.target_id]

            url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
            async with aiohttp.ClientSession() as session, session.get(url) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                metrics = await response.text()
            labels = (
                f'endpoint="{KEY.endpoint}",model="llama",node="n1",target_id="{KEY.target_id}"'
            )
            assert f"infermesh_agent_target_running{{{labels}}} 2.0" in metrics
            assert f"infermesh_agent_target_in_flight{{{labels}}} 1.0" in metrics
            assert 'infermesh_agent_score_requests_total{result="ok"} 1.0' in metrics

            process.send_signal(signal.SIGTERM)
            with anyio.fail_after(10):
                returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
    assert returncode == 0, log_path.read_text()
    assert not socket_path.exists()
    assert "agent stopped" in log_path.read_text()


async def test_agent_process_refuses_bad_flags_with_a_clear_message(workdir: Path) -> None:
    result = await anyio.run_process(
        [*AGENT, "--socket", str(workdir / "a.sock"), "--runtime", "no-equals-sign"],
        check=False,
        env=child_env(),
    )
    assert result.returncode == 2
    assert b"expected KIND=URL" in result.stderr


async def test_agent_process_rejects_an_unknown_scorer_weight_before_binding(
    workdir: Path,
) -> None:
    config = workdir / "agent.toml"
    config.write_text("[scoring.weights]\nqueu = 2.0\n")
    socket_path = workdir / "sock" / "agent.sock"
    result = await anyio.run_process(
        [*AGENT, "--config", str(config), "--socket", str(socket_path)],
        check=False,
        env=child_env(),
    )
    assert result.returncode == 1
    expected = (
        b"unknown scorer(s) 'queu'; registered scorers: gpu_health, kv, net_penalty, prefix, queue"
    )
    assert expected in result.stderr
    assert not socket_path.parent.exists()

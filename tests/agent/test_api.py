"""The agent's gRPC APIs over a real Unix socket, driven by a grpcio client."""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from infermesh.agent.api import state as state_api
from infermesh.agent.api.server import unix_target
from infermesh.agent.daemon import Agent, AgentStartupError
from infermesh.core import builtin as core_plugin
from infermesh.core.config import AgentConfig, Config, NodeConfig, RuntimeConfig
from infermesh.core.contracts import AdapterContext
from infermesh.core.convert import (
    gpu_delta_to_pb,
    model_delta_to_pb,
    request_features_to_pb,
)
from infermesh.core.hookspecs import RegisterRuntimeAdapter, hookimpl
from infermesh.core.model import (
    GpuKey,
    GpuStateDelta,
    ModelStateDelta,
    RequestFeatures,
    TargetKey,
)
from infermesh.core.plugins import PluginHost
from infermesh.core.proto import (
    scoring_pb2,
    scoring_pb2_grpc,
    state_pb2,
    state_pb2_grpc,
    types_pb2,
)

pytestmark = pytest.mark.anyio

A = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8001")
B = TargetKey(model="llama", node="n1", endpoint="http://127.0.0.1:8002")


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte limit of a Unix socket path
    path = Path(tempfile.mkdtemp(prefix="im-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def agent_config(socket_dir: Path, **agent: Any) -> Config:
    agent.setdefault("socket", str(socket_dir / "run" / "agent.sock"))
    agent.setdefault("metrics_listen", "")
    agent.setdefault("shutdown_grace_s", 2.0)
    return Config(node=NodeConfig(id="n1"), agent=AgentConfig(**agent))


def make_agent(config: Config) -> Agent:
    return Agent(config, PluginHost.load(entry_point_list=[], extra=[("core", core_plugin)]))


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[grpc.aio.Channel]:
    async with anyio.create_task_group() as tg:
        await tg.start(partial(agent.run, handle_signals=False))
        channel = grpc.aio.insecure_channel(unix_target(agent.config.agent.socket))
        try:
            yield channel
        finally:
            await channel.close()
            agent.request_stop()


def delta(key: TargetKey, version: int, **changes: Any) -> types_pb2.ModelStateDelta:
    changes.setdefault("last_updated", time.time())
    return model_delta_to_pb(ModelStateDelta(key, version, changes))


async def push(channel: grpc.aio.Channel, *deltas: types_pb2.ModelStateDelta) -> Any:
    return await state_pb2_grpc.StateStub(channel).PushModelDeltas(iter(deltas))


def score_request(model: str = "llama", **features: Any) -> scoring_pb2.ScoreTargetsRequest:
    return scoring_pb2.ScoreTargetsRequest(
        request=request_features_to_pb(RequestFeatures(model=model, **features)), reserve=True
    )


async def test_health_is_serving_and_reflection_lists_the_services(socket_dir: Path) -> None:
    async with running(make_agent(agent_config(socket_dir))) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "infermesh.v1.Scoring", "infermesh.v1.State"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = set()
        async for reply in call:
            services = {s.name for s in reply.list_services_response.service}
        assert {
            "infermesh.v1.Scoring",
            "infermesh.v1.State",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services


async def test_pushed_state_is_scored_reserved_and_released_by_outcomes(socket_dir: Path) -> None:
    agent = make_agent(agent_config(socket_dir))
    async with running(agent) as channel:
        ack = await push(
            channel,
            delta(A, 1, running=30.0, waiting=5.0, kv_cache_usage=0.9),
            delta(B, 1, running=0.0, kv_cache_usage=0.1),
            delta(B, 1, running=99.0),
        )
        assert (ack.applied, ack.stale) == (2, 1)
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        reply = await scoring.ScoreTargets(score_request())
        assert reply.model_known
        assert reply.candidates == 2
        assert [t.target_id for t in reply.targets] == [B.target_id, A.target_id]
        best = reply.targets[0]
        assert best.key.endpoint == "http://127.0.0.1:8002"
        assert best.transport == "openai-http"
        assert {r.scorer for r in best.reasons} == {
            "queue",
            "kv",
            "prefix",
            "net_penalty",
            "gpu_health",
        }
        assert reply.reservation_id
        assert agent.inflight.open_count(B.target_id) == 1

        outcome = scoring_pb2.Outcome(
            reservation_id=reply.reservation_id, ok=True, status=200, ttft_s=0.05, latency_s=0.4
        )
        ack2 = await scoring.ReportOutcome(scoring_pb2.OutcomeBatch(outcomes=[outcome]))
        assert ack2.accepted == 1
        assert agent.inflight.open_count(B.target_id) == 0
        stats = agent.inflight.stats(B.target_id)
        assert stats is not None
        assert stats.ttft_ewma_s == pytest.approx(0.05)


async def test_unknown_models_and_unavailable_targets_are_told_apart(socket_dir: Path) -> None:
    async with running(make_agent(agent_config(socket_dir))) as channel:
        await push(channel, delta(A, 1, healthy=False, health_reason="GET /health: 503"))
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        unknown = await scoring.ScoreTargets(score_request("mistral"))
        assert not unknown.model_known
        assert list(unknown.targets) == []
        unavailable = await scoring.ScoreTargets(score_request())
        assert unavailable.model_known
        assert list(unavailable.targets) == []
        assert unavailable.retry_after_s > 0
        assert unavailable.reservation_id == ""
        assert list(unavailable.excluded) == [f"{A.target_id}: unhealthy: GET /health: 503"]


async def test_admit_reserves_a_fallback_target_or_says_why_not(socket_dir: Path) -> None:
    agent = make_agent(agent_config(socket_dir))
    async with running(agent) as channel:
        await push(channel, delta(A, 1), delta(B, 1, warming=True))
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        features = request_features_to_pb(RequestFeatures(model="llama"))
        admitted = await scoring.Admit(
            scoring_pb2.AdmitRequest(request=features, target_id=A.target_id)
        )
        assert admitted.admitted
        assert agent.inflight.get(admitted.reservation_id) is not None
        warming = await scoring.Admit(
            scoring_pb2.AdmitRequest(request=features, target_id=B.target_id)
        )
        assert (warming.admitted, warming.reason) == (False, "warming up")
        assert warming.retry_after_s > 0
        unknown = await scoring.Admit(
            scoring_pb2.AdmitRequest(request=features, target_id="n9|http://x:1|llama")
        )
        assert not unknown.admitted
        assert "unknown target" in unknown.reason
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await scoring.Admit(scoring_pb2.AdmitRequest(request=features, target_id="nonsense"))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed target id" in str(error.value.details())


async def test_bad_requests_get_invalid_argument_with_a_message(socket_dir: Path) -> None:
    async with running(make_agent(agent_config(socket_dir))) as channel:
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await scoring.ScoreTargets(scoring_pb2.ScoreTargetsRequest())
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model is empty" in str(error.value.details())
        bad = delta(A, 1)
        bad.changed.append("runing")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await push(channel, bad)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "delta #1" in str(error.value.details())
        assert "'runing'" in str(error.value.details())


async def test_state_can_be_listed_fetched_and_watched(socket_dir: Path) -> None:
    async with running(make_agent(agent_config(socket_dir))) as channel:
        state = state_pb2_grpc.StateStub(channel)
        await push(channel, delta(A, 1, running=1.0))
        gpu = GpuStateDelta(GpuKey("n1", "GPU-0"), 1, {"utilization": 0.5})
        gpu_ack = await state.PushGpuDeltas(iter([gpu_delta_to_pb(gpu)]))
        assert gpu_ack.applied == 1

        listed = await state.ListModelStates(state_pb2.ListRequest(model="llama"))
        assert [s.key.endpoint for s in listed.states] == [A.endpoint]
        got = await state.GetModelState(listed.states[0].key)
        assert got.fields.running == 1.0
        gpus = await state.ListGpuStates(state_pb2.ListRequest(node="n1"))
        assert [g.key.gpu_uuid for g in gpus.states] == ["GPU-0"]

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await state.GetModelState(
                types_pb2.TargetKey(model="m", node="n1", endpoint="http://z")
            )
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no target 'n1|http://z|m'" in str(error.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await state.GetGpuState(types_pb2.GpuKey(node="n1", gpu_uuid="GPU-7"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

        watch = state.WatchModelDeltas(state_pb2.WatchRequest(initial_snapshot=True))
        snapshot = await watch.read()
        assert (snapshot.key.endpoint, snapshot.version) == (A.endpoint, 1)
        assert "running" in snapshot.changed
        await push(channel, delta(B, 4, waiting=3.0))
        update = await watch.read()
        assert (update.key.endpoint, update.version, update.fields.waiting) == (B.endpoint, 4, 3.0)
        watch.cancel()


async def test_a_live_agent_on_the_socket_makes_a_second_one_refuse(socket_dir: Path) -> None:
    async with running(make_agent(agent_config(socket_dir))):
        second = make_agent(agent_config(socket_dir))
        with pytest.raises(AgentStartupError, match=r"another process .* is serving on"):
            await second.run(handle_signals=False)
        socket_file = anyio.Path(socket_dir / "run" / "agent.sock")
        assert await socket_file.exists(), "the first agent's socket stays"


async def test_a_stale_socket_file_is_replaced_and_removed_on_stop(socket_dir: Path) -> None:
    path = socket_dir / "run" / "agent.sock"
    path.parent.mkdir()
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays behind, as after a crash
    agent = make_agent(agent_config(socket_dir))
    async with running(agent) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert not path.exists()


async def test_a_regular_file_at_the_socket_path_is_not_replaced(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    path.write_text("precious")
    agent = make_agent(agent_config(socket_dir, socket=str(path)))
    with pytest.raises(AgentStartupError, match="exists and is not a socket"):
        await agent.run(handle_signals=False)
    assert path.read_text() == "precious"


async def test_tcp_listen_serves_the_same_apis(socket_dir: Path) -> None:
    agent = make_agent(agent_config(socket_dir, listen="127.0.0.1:0"))
    async with running(agent):
        assert agent.grpc.tcp_port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{agent.grpc.tcp_port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="infermesh.v1.Scoring")
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_an_unknown_runtime_kind_is_an_error_listing_known_kinds(socket_dir: Path) -> None:
    config = agent_config(socket_dir)
    config.runtimes.append(RuntimeConfig(kind="vllmm", url="http://127.0.0.1:8000"))
    with pytest.raises(AgentStartupError, match=r"runtimes\[0\]: unknown kind 'vllmm'; known"):
        make_agent(config)


def test_an_unknown_scoring_weight_stops_the_agent_before_it_binds(socket_dir: Path) -> None:
    config = agent_config(socket_dir)
    config.scoring.weights["qeue"] = 2.0
    with pytest.raises(AgentStartupError, match="unknown scorer"):
        make_agent(config)
    assert not (socket_dir / "run").exists()


async def test_outcomes_can_be_streamed_in_batches(socket_dir: Path) -> None:
    agent = make_agent(agent_config(socket_dir))
    async with running(agent) as channel:
        await push(channel, delta(A, 1))
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        reservations = [
            (await scoring.ScoreTargets(score_request())).reservation_id for _ in range(3)
        ]
        batches = [
            scoring_pb2.OutcomeBatch(
                outcomes=[scoring_pb2.Outcome(reservation_id=r, ok=False, status=502)]
            )
            for r in reservations
        ]
        ack = await scoring.StreamOutcomes(iter(batches))
        assert ack.accepted == 3
        assert agent.inflight.open_count() == 0
        stats = agent.inflight.stats(A.target_id)
        assert stats is not None
        assert stats.error_rate > 0


async def test_a_watcher_that_falls_behind_is_told_to_resync(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(state_api, "WATCH_BUFFER", 2)
    agent = make_agent(agent_config(socket_dir))
    async with running(agent) as channel:
        await push(channel, delta(A, 1))
        watch = state_pb2_grpc.StateStub(channel).WatchModelDeltas(
            state_pb2.WatchRequest(initial_snapshot=True)
        )
        assert (await watch.read()).version == 1  # the snapshot: the watch is registered
        # five writes with no await in between: the watcher cannot drain its buffer meanwhile
        for version in range(2, 7):
            agent.store.apply_model_delta(ModelStateDelta(A, version, {"running": 1.0}))
        received = [(await watch.read()).version, (await watch.read()).version]
        assert received == [2, 3]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await watch.read()
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "initial_snapshot" in str(error.value.details())


class ScriptedAdapter:
    """A runtime adapter from a test plugin: one delta per stream, the first stream then fails."""

    def __init__(self, context: AdapterContext) -> None:
        self.key = TargetKey(model="llama", node=context.node, endpoint=context.url)
        self.streams = 0
        self.restarted = anyio.Event()
        self.closed = False

    async def deltas(self) -> AsyncIterator[ModelStateDelta]:
        self.streams += 1
        yield ModelStateDelta(self.key, self.streams, {"last_updated": time.time()})
        if self.streams == 1:
            raise RuntimeError("scrape exploded")
        self.restarted.set()
        await anyio.sleep_forever()

    async def aclose(self) -> None:
        self.closed = True


class ScriptedPlugin:
    def __init__(self) -> None:
        self.adapters: list[ScriptedAdapter] = []

    def make(self, context: AdapterContext) -> ScriptedAdapter:
        self.adapters.append(ScriptedAdapter(context))
        return self.adapters[-1]

    @hookimpl
    def infermesh_register_runtime_adapters(self, register: RegisterRuntimeAdapter) -> None:
        register("scripted", self.make)


async def test_runtime_adapters_feed_the_store_are_restarted_and_closed(socket_dir: Path) -> None:
    plugin = ScriptedPlugin()
    config = agent_config(socket_dir)
    url = "http://127.0.0.1:8009"
    config.runtimes.append(RuntimeConfig(kind="scripted", url=url, transport="kserve-http"))
    host = PluginHost.load(entry_point_list=[], extra=[("core", core_plugin), ("t", plugin)])
    agent = Agent(config, host)
    async with running(agent) as channel:
        (adapter,) = plugin.adapters
        with anyio.fail_after(10):
            await adapter.restarted.wait()  # the failed stream was restarted
        reply = await scoring_pb2_grpc.ScoringStub(channel).ScoreTargets(score_request())
        assert [(t.key.endpoint, t.transport) for t in reply.targets] == [(url, "kserve-http")]
        restarts = agent.metrics.registry.get_sample_value(
            "infermesh_agent_adapter_restarts_total", {"adapter": "scripted-0"}
        )
        assert restarts == 1
    assert adapter.closed


class FakeClock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_an_outcome_reported_late_takes_its_finished_request_off_the_scraped_load(
    socket_dir: Path,
) -> None:
    clock = FakeClock(1_000.0)
    host = PluginHost.load(entry_point_list=[], extra=[("core", core_plugin)])
    agent = Agent(agent_config(socket_dir), host, clock=clock)
    target_id = A.target_id
    async with running(agent) as channel:
        await push(channel, delta(A, 1, running=0.0, last_updated=999.9))
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        reply = await scoring.ScoreTargets(score_request())  # reserved at 1000.0
        # the scrape at 1000.2 counts it running; it finishes at 1000.3 (latency 0.3 s) and
        # its outcome arrives at 1000.4, in a batch with one the runtime refused
        await push(channel, delta(A, 2, running=1.0, last_updated=1_000.2))
        refused = await scoring.ScoreTargets(score_request())
        clock.now = 1_000.4
        await scoring.ReportOutcome(
            scoring_pb2.OutcomeBatch(
                outcomes=[
                    scoring_pb2.Outcome(
                        reservation_id=reply.reservation_id, ok=True, status=200, latency_s=0.3
                    ),
                    scoring_pb2.Outcome(
                        reservation_id=refused.reservation_id, ok=False, status=503
                    ),
                ]
            )
        )
        assert agent.inflight.finished_unseen(target_id, 1_000.2) == 1
        after = await scoring.ScoreTargets(score_request())
        queue = next(r.reason for r in after.targets[0].reasons if r.scorer == "queue")
        assert "running 0, waiting 0, in-flight 0; scraped running 1, waiting 0; 1 finished" in (
            queue
        )
        # telemetry read after the finish ends the correction
        await push(channel, delta(A, 3, running=0.0, last_updated=1_000.35))
        assert agent.inflight.finished_unseen(target_id, 1_000.35) == 0

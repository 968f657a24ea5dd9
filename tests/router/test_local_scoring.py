"""Local scoring: the router ranks in process on a replica of the agent's state, kept by the
agent's State watch streams, and keeps serving from it while the agent is away.

Each test drives the router over HTTP against the fake agent of conftest.py, changing what the
agent publishes and checking where requests land and what the router answers.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import attrs
import pytest

from infermesh.core.config import ScoringConfig
from infermesh.core.contracts import Scorer, ScoreResult, TargetView
from infermesh.core.model import GpuKey, GpuState, Labels, RequestFeatures
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.router.app import RouterApp
from infermesh.router.local_scoring import LocalScoring

from .conftest import (
    NODE,
    TEST_SCORING,
    FakeAgent,
    FakeRuntime,
    Mesh,
    make_scoring,
    plain_http_client,
    replica_holds,
    running_router,
    serving_fake_agent,
    target_id,
    wait_for,
    wait_until,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}

pytestmark = pytest.mark.anyio


def local(app: RouterApp) -> LocalScoring:
    assert isinstance(app.scoring, LocalScoring)
    return app.scoring


async def served_by(mesh: Mesh, count: int = 1) -> list[str]:
    """Send `count` chat requests one after another; the runtime that answered each."""
    names = []
    for _ in range(count):
        response = await mesh.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        names.append(response.headers["x-runtime"])
    return names


@attrs.frozen
class Runtimes:
    a: FakeRuntime
    b: FakeRuntime


@contextlib.asynccontextmanager
async def two_runtimes() -> AsyncIterator[Runtimes]:
    a, b = FakeRuntime("a"), FakeRuntime("b")
    await a.start()
    await b.start()
    try:
        yield Runtimes(a, b)
    finally:
        await a.stop()
        await b.stop()


# ----------------------------------------------------------------------------- routing


async def test_requests_follow_the_streamed_state_without_asking_the_agent(
    local_mesh: Mesh,
) -> None:
    mesh, agent = local_mesh, local_mesh.agent
    await mesh.publish(
        agent.state_of("m", mesh.a.endpoint, kv_cache_usage=0.9),
        agent.state_of("m", mesh.b.endpoint, kv_cache_usage=0.1),
    )
    assert await served_by(mesh, 2) == ["b", "b"]
    await mesh.publish(
        agent.state_of("m", mesh.a.endpoint, kv_cache_usage=0.0),
        agent.state_of("m", mesh.b.endpoint, kv_cache_usage=0.95),
    )
    assert await served_by(mesh, 2) == ["a", "a"]
    assert agent.score_requests == [], "local mode never calls ScoreTargets"
    outcomes = await agent.wait_outcomes(4)
    assert [o.target_id for o in outcomes] == [target_id("m", mesh.b.endpoint)] * 2 + [
        target_id("m", mesh.a.endpoint)
    ] * 2
    assert all(o.ok and o.reservation_id.startswith("router-") for o in outcomes)
    assert local(mesh.app).inflight.open_count() == 0


async def test_a_delta_marking_a_target_unhealthy_stops_routing_to_it(local_mesh: Mesh) -> None:
    mesh, agent = local_mesh, local_mesh.agent
    assert await served_by(mesh) == ["a"]
    await mesh.publish(
        agent.state_of("m", mesh.a.endpoint, healthy=False, health_reason="engine dead")
    )
    assert await served_by(mesh, 2) == ["b", "b"]
    await mesh.publish(agent.state_of("m", mesh.b.endpoint, healthy=False, health_reason="OOM"))
    response = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "no_healthy_target"
    assert "engine dead" in error["message"]
    assert "OOM" in error["message"]
    assert int(response.headers["retry-after"]) >= 1


async def test_a_gpu_delta_marking_a_gpu_unhealthy_excludes_the_targets_on_it(
    local_mesh: Mesh,
) -> None:
    mesh, agent = local_mesh, local_mesh.agent
    on_gpu = Labels(model="m", runtime="vllm", node=NODE, gpu_uuid="GPU-a")
    await mesh.publish(agent.state_of("m", mesh.a.endpoint, labels=on_gpu))
    assert await served_by(mesh) == ["a"]
    gpu = GpuState(key=GpuKey(NODE, "GPU-a"), ecc_dbe_volatile=2, version=agent.next_version())
    agent.publish_gpu(gpu)
    replica = local(mesh.app).replica

    def gpu_seen() -> bool:
        live = replica.live
        return live is not None and live.get_gpu(gpu.key) is not None

    await wait_until(gpu_seen, "the router to see the GPU delta")
    assert await served_by(mesh, 2) == ["b", "b"]


async def test_the_builtin_scorers_send_new_work_away_from_a_saturated_target() -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket = Path(workdir) / "agent.sock"
        async with (
            two_runtimes() as rt,
            serving_fake_agent(socket) as (agent, _),
        ):
            agent.publish(
                agent.state_of("m", rt.a.endpoint, running=8, waiting=40, kv_cache_usage=0.9),
                agent.state_of("m", rt.b.endpoint),
            )
            scoring = make_scoring("local", f"unix://{socket}", scoring=ScoringConfig())
            async with running_router(scoring) as (url, app), plain_http_client(url) as http:
                await wait_until(lambda: _synced(app), "the first sync")
                landed = []
                for n in range(6):
                    body = {**CHAT, "messages": [{"role": "user", "content": f"question {n}"}]}
                    response = await http.post("/v1/chat/completions", json=body)
                    landed.append(response.headers["x-runtime"])
    assert landed == ["b"] * 6


class PinScorer:
    """A third-party scorer: everything on one endpoint scores 1, the rest 0."""

    name = "pin"
    default_weight = 10.0

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def score(self, request: RequestFeatures, targets: Sequence[TargetView]) -> list[ScoreResult]:
        return [
            ScoreResult(1.0 if view.key.endpoint == self.endpoint else 0.0, "pinned")
            for view in targets
        ]


async def test_a_third_party_scorer_takes_part_in_local_ranking() -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket = Path(workdir) / "agent.sock"
        async with two_runtimes() as rt, serving_fake_agent(socket) as (agent, _):
            agent.route("m", [rt.a.endpoint, rt.b.endpoint])  # the KV scorer prefers a
            pin = PinScorer(rt.b.endpoint)
            scorers: dict[str, Scorer] = {s.name: s for s in [*builtin_scorers(), pin]}
            scoring = make_scoring("local", f"unix://{socket}", scorers=scorers)
            async with running_router(scoring) as (url, app), plain_http_client(url) as http:
                await wait_until(lambda: _synced(app), "the first sync")
                response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.headers["x-runtime"] == "b"


def _synced(app: RouterApp) -> bool:
    return local(app).replica.connected


# ----------------------------------------------------------------------------- the stream


async def test_a_dropped_watch_stream_is_reopened_and_its_snapshot_adopted(
    local_mesh: Mesh,
) -> None:
    mesh, agent = local_mesh, local_mesh.agent
    replica = local(mesh.app).replica
    assert replica.syncs == 1
    agent.drop_watchers()
    await wait_until(lambda: replica.syncs == 2, "the router to resync")
    assert agent.watch_calls == 4, "one model and one GPU stream per connection"
    await mesh.route("m", [mesh.b.endpoint, mesh.a.endpoint])
    assert await served_by(mesh) == ["b"]
    metrics = (await mesh.http.get("/metrics")).text
    assert "infermesh_router_state_syncs_total 2.0" in metrics
    assert "infermesh_router_state_connected 1.0" in metrics


async def test_the_router_serves_through_an_agent_restart_and_adopts_the_new_state() -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket = Path(workdir) / "agent.sock"
        async with two_runtimes() as rt:
            scoring = make_scoring("local", f"unix://{socket}")
            replica = local_scoring(scoring).replica
            async with running_router(scoring) as (url, app), plain_http_client(url) as http:
                async with serving_fake_agent(socket) as (first, _):
                    first.route("m", [rt.a.endpoint, rt.b.endpoint])
                    await wait_until(lambda: replica.connected, "the first sync")
                # The agent is gone: the router keeps routing on what it last knew.
                await wait_until(lambda: not replica.connected, "the router to notice")
                response = await http.post("/v1/chat/completions", json=CHAT)
                assert (response.status_code, response.headers["x-runtime"]) == (200, "a")
                assert (await http.get("/health")).status_code == 200
                # A new agent whose versions start lower, serving only b: taken as it is.
                restarted = FakeAgent(first_version=1)
                restarted.route("m", [rt.b.endpoint])
                async with serving_fake_agent(socket, restarted):
                    await wait_until(lambda: replica.syncs == 2, "the router to resync")
                    assert replica_holds(app, {target_id("m", rt.b.endpoint): 1})
                    response = await http.post("/v1/chat/completions", json=CHAT)
                    assert response.headers["x-runtime"] == "b"
                    live = replica.live
                    assert live is not None
                    assert live.get_target(target_id("m", rt.a.endpoint)) is None
                    outcome = await restarted.wait_outcome_for(target_id("m", rt.b.endpoint))
                    assert outcome.ok


def local_scoring(scoring: object) -> LocalScoring:
    assert isinstance(scoring, LocalScoring)
    return scoring


async def test_until_the_first_snapshot_requests_get_503_and_health_is_unavailable() -> None:
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket = Path(workdir) / "agent.sock"
        async with two_runtimes() as rt, serving_fake_agent(socket) as (agent, _):
            agent.route("m", [rt.a.endpoint])
            agent.snapshot_gate.clear()  # the streams open but send nothing yet
            scoring = make_scoring("local", f"unix://{socket}")
            async with running_router(scoring) as (url, app), plain_http_client(url) as http:
                await wait_until(lambda: agent.watch_calls >= 2, "the router to open its streams")
                health = await http.get("/health")
                assert health.status_code == 503
                assert "no state from the InferMesh agent" in health.json()["reason"]
                assert health.json()["scoring"] == "local"
                response = await http.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "agent_unavailable"
                assert (await http.get("/v1/models")).status_code == 503
                agent.snapshot_gate.set()
                await wait_until(lambda: _synced(app), "the first sync")
                assert (await http.get("/health")).status_code == 200
                response = await http.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 200
                models = (await http.get("/v1/models")).json()
                assert [model["id"] for model in models["data"]] == ["m"]


async def test_once_the_last_state_is_stale_the_router_answers_503_and_reports_unhealthy() -> None:
    stale_after_s = 1.0
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket = Path(workdir) / "agent.sock"
        async with two_runtimes() as rt:
            config = attrs.evolve(TEST_SCORING, stale_after_s=stale_after_s)
            scoring = make_scoring("local", f"unix://{socket}", scoring=config)
            replica = local_scoring(scoring).replica
            async with running_router(scoring) as (url, _), plain_http_client(url) as http:
                async with serving_fake_agent(socket) as (agent, _):
                    agent.route("m", [rt.a.endpoint])
                    await wait_until(lambda: replica.connected, "the first sync")
                    assert (await http.get("/health")).status_code == 200

                async def unhealthy() -> bool:
                    return (await http.get("/health")).status_code == 503

                await wait_for(unhealthy, "health to turn unavailable")
                health = await http.get("/health")
                assert "stale after 1s" in health.json()["reason"]
                response = await http.post("/v1/chat/completions", json=CHAT)
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "no_healthy_target"

"""Local scoring and the network: the router polls its agent's gossip RTT estimates
(ListNodeRtts) and its net_penalty scorer prefers a near replica; an agent that lacks the call or
fails it never costs a request.

Each test runs the router under uvicorn against a fake agent on a real Unix socket (conftest.py)
whose State service may also answer ListNodeRtts, and two fake runtimes on different nodes.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from infermesh.core.model import ModelState, RequestFeatures, TargetKey
from infermesh.core.proto import scoring_pb2_grpc, state_pb2, state_pb2_grpc
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.router.agent_client import AgentClient
from infermesh.router.local_scoring import LocalScoring
from infermesh.router.replica import NodeRtts

from .conftest import (
    TEST_SCORING,
    FakeAgent,
    FakeRuntime,
    FakeScoring,
    FakeState,
    plain_http_client,
    running_router,
    serving_fake_agent,
    wait_until,
)

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}
NEAR, FAR = "near-node", "far-node"


class RttAgentState(FakeState):
    """The fake agent's State service, also listing `rtts`; fails the first `failures` calls."""

    def __init__(self, agent: FakeAgent, rtts: dict[str, float], failures: int = 0) -> None:
        super().__init__(agent)
        self.rtts = rtts
        self.failures = failures
        self.calls = 0

    async def ListNodeRtts(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.NodeRttList:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gossip not ready (test)")
        listed = [state_pb2.NodeRtt(node=n, rtt_s=r) for n, r in sorted(self.rtts.items())]
        return state_pb2.NodeRttList(rtts=listed)


def rtt_state(rtts: dict[str, float], failures: int = 0) -> RttAgentState:
    # Like FakeState, it implements only the State methods a router calls.
    return RttAgentState(FakeAgent(), rtts, failures)  # type: ignore[abstract]


@contextlib.asynccontextmanager
async def serving(socket_path: Path, state: FakeState) -> AsyncIterator[None]:
    """`state` (and Scoring for its agent) served on `socket_path`."""
    server = grpc.aio.server()
    scoring_pb2_grpc.add_ScoringServicer_to_server(FakeScoring(state.agent), server)
    state_pb2_grpc.add_StateServicer_to_server(state, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_insecure_port(f"unix://{socket_path}")
    await server.start()
    try:
        yield
    finally:
        state.agent.drop_watchers()
        await server.stop(None)


@attrs.frozen
class Setup:
    agent: FakeAgent
    scoring: LocalScoring
    url: str
    a: FakeRuntime
    b: FakeRuntime


@contextlib.asynccontextmanager
async def router_on(state: RttAgentState | None) -> AsyncIterator[Setup]:
    """Runtimes a (on NEAR) and b (on FAR), equally loaded, behind a local-mode router whose
    agent serves `state` (None: an agent without ListNodeRtts)."""
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket_path = Path(workdir) / "agent.sock"
        agent = state.agent if state is not None else FakeAgent()
        a, b = FakeRuntime("a"), FakeRuntime("b")
        await a.start()
        await b.start()
        agent.publish(on_node(agent, a.endpoint, NEAR), on_node(agent, b.endpoint, FAR))
        scoring = LocalScoring(
            AgentClient(f"unix://{socket_path}", timeout_s=2.0, models_cache_s=0.0),
            {s.name: s for s in builtin_scorers()},
            TEST_SCORING,
            watcher_backoff_s=(0.02, 0.2),
            rtt_poll_s=(0.02, 0.1),
        )
        try:
            async with contextlib.AsyncExitStack() as stack:
                if state is not None:
                    await stack.enter_async_context(serving(socket_path, state))
                else:
                    await stack.enter_async_context(serving_fake_agent(socket_path, agent))
                url, _ = await stack.enter_async_context(running_router(scoring))
                await wait_until(lambda: scoring.replica.live is not None, "the replica to sync")
                yield Setup(agent, scoring, url, a, b)
        finally:
            await a.stop()
            await b.stop()


def on_node(agent: FakeAgent, endpoint: str, node: str) -> ModelState:
    state = agent.state_of("m", endpoint)
    key = TargetKey(model="m", node=node, endpoint=endpoint)
    return attrs.evolve(state, key=key, labels=attrs.evolve(state.labels, node=node))


async def served_by(url: str, count: int) -> list[str]:
    async with plain_http_client(url) as http:
        names = []
        for _ in range(count):
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
            names.append(response.headers["x-runtime"])
        return names


def net_penalty_reasons(scoring: LocalScoring) -> dict[str, str]:
    """The net_penalty reason the router's engine gives each target of `m`, by node."""
    ranking = scoring.engine.rank(RequestFeatures(model="m"), time.time())
    return {
        target.state.key.node: reason.reason
        for target in ranking.targets
        for reason in target.reasons
        if reason.scorer == "net_penalty"
    }


async def test_the_router_prefers_the_replica_its_agent_estimates_nearer() -> None:
    rtts = {NEAR: 0.0005, FAR: 0.040}
    state = rtt_state(rtts)
    async with router_on(state) as setup:
        scoring = setup.scoring
        await wait_until(lambda: scoring.rtts.get(FAR) == 0.040, "the router to get the RTTs")
        assert await served_by(setup.url, 3) == ["a", "a", "a"]
        assert net_penalty_reasons(scoring) == {NEAR: "rtt 0.5 ms", FAR: "rtt 40.0 ms"}

        # The estimates move (the far node came closer, the near one went away): so does traffic.
        rtts[NEAR], rtts[FAR] = 0.045, 0.002
        await wait_until(lambda: scoring.rtts.get(NEAR) == 0.045, "the router to see new RTTs")
        assert await served_by(setup.url, 3) == ["b", "b", "b"]
        assert net_penalty_reasons(scoring) == {NEAR: "rtt 45.0 ms", FAR: "rtt 2.0 ms"}


async def test_failing_rtt_calls_cost_no_request_and_estimates_arrive_once_the_agent_answers() -> (
    None
):
    state = rtt_state({NEAR: 0.0005, FAR: 0.040}, failures=3)
    async with router_on(state) as setup:
        scoring = setup.scoring
        # Served whatever the RTT poll is doing meanwhile.
        assert len(await served_by(setup.url, 2)) == 2
        await wait_until(lambda: scoring.rtts.get(FAR) == 0.040, "the router to get the RTTs")
        assert state.calls > state.failures
        assert await served_by(setup.url, 2) == ["a", "a"]


async def test_an_agent_without_list_node_rtts_leaves_every_node_local() -> None:
    async with router_on(None) as setup:
        scoring = setup.scoring
        watcher = scoring.rtt_watcher
        # It keeps asking (with backoff), in case the agent is upgraded in place.
        await wait_until(lambda: watcher.failures >= 3, "the router to retry ListNodeRtts")
        assert len(scoring.rtts) == 0
        assert len(await served_by(setup.url, 2)) == 2
        reasons = net_penalty_reasons(scoring)
        assert reasons == {NEAR: "rtt unknown: treated as local", FAR: reasons[NEAR]}


def test_node_rtts_skip_what_no_agent_should_send() -> None:
    rtts = NodeRtts()
    skipped = rtts.replace(
        [("n1", 0.01), ("", 0.02), ("n2", float("nan")), ("n3", -1.0), ("n" * 300, 0.01)]
    )
    assert skipped == 4
    assert rtts.as_dict() == {"n1": 0.01}
    assert rtts.get("n2") is None
    rtts.replace([("n2", 0.03)])
    assert rtts.as_dict() == {"n2": 0.03}, "a listing replaces the previous one"

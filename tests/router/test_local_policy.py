"""Local scoring follows the agent's operator policy: the router polls State.GetPolicy, and a
node the operator drains gets no more of the router's requests until it is undrained; an agent
without the call or with an unreadable document never costs a request.

The router runs under uvicorn against a fake agent on a real Unix socket (conftest.py) with two
fake runtimes on different nodes; the agent's RTT estimates make the `near` one preferred, so a
drain is what moves traffic off it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from infermesh.core.model import ModelState, TargetKey
from infermesh.core.policy import DrainNode, PolicySet, UndrainNode
from infermesh.core.proto import scoring_pb2_grpc, state_pb2, state_pb2_grpc
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.router.agent_client import AgentClient
from infermesh.router.local_scoring import LocalScoring

from .conftest import (
    TEST_SCORING,
    FakeAgent,
    FakeRuntime,
    FakeScoring,
    FakeState,
    plain_http_client,
    running_router,
    wait_until,
)

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Say hello"}]}
NEAR, FAR = "near-node", "far-node"


class PolicyAgentState(FakeState):
    """The fake agent's State service, also answering ListNodeRtts (NEAR is near) and, unless
    `serves_policy` is false, GetPolicy with `policy` (or the raw `document`, when set)."""

    def __init__(self, agent: FakeAgent, serves_policy: bool = True) -> None:
        super().__init__(agent)
        self.serves_policy = serves_policy
        self.policy = PolicySet()
        self.document: tuple[int, str] | None = None
        self.policy_calls = 0

    async def ListNodeRtts(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.NodeRttList:
        rtts = [state_pb2.NodeRtt(node=NEAR, rtt_s=0.0005), state_pb2.NodeRtt(node=FAR, rtt_s=0.04)]
        return state_pb2.NodeRttList(rtts=rtts)

    async def GetPolicy(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.PolicySnapshot:
        self.policy_calls += 1
        if not self.serves_policy:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found! (test)")
        if self.document is not None:
            revision, text = self.document
            return state_pb2.PolicySnapshot(revision=revision, json=text)
        return state_pb2.PolicySnapshot(
            revision=self.policy.revision, json=json.dumps(self.policy.to_document())
        )


@attrs.frozen
class Setup:
    state: PolicyAgentState
    scoring: LocalScoring
    url: str


def on_node(agent: FakeAgent, endpoint: str, node: str) -> ModelState:
    state = agent.state_of("m", endpoint)
    key = TargetKey(model="m", node=node, endpoint=endpoint)
    return attrs.evolve(state, key=key, labels=attrs.evolve(state.labels, node=node))


@contextlib.asynccontextmanager
async def router_on(state: PolicyAgentState) -> AsyncIterator[Setup]:
    """Runtimes a (on NEAR) and b (on FAR) behind a local-mode router whose agent serves
    `state`; yields once the router ranks with the RTTs (so it prefers a)."""
    with tempfile.TemporaryDirectory(prefix="im-router-", dir="/tmp") as workdir:
        socket_path = Path(workdir) / "agent.sock"
        agent = state.agent
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
            policy_poll_s=(0.02, 0.1),
        )
        server = grpc.aio.server()
        scoring_pb2_grpc.add_ScoringServicer_to_server(FakeScoring(agent), server)
        state_pb2_grpc.add_StateServicer_to_server(state, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
        try:
            async with running_router(scoring) as (url, _):
                await wait_until(lambda: scoring.replica.live is not None, "the replica to sync")
                await wait_until(lambda: scoring.rtts.get(FAR) == 0.04, "the router's RTTs")
                yield Setup(state, scoring, url)
        finally:
            agent.drop_watchers()
            await server.stop(None)
            await a.stop()
            await b.stop()


async def served_by(url: str, count: int) -> list[str]:
    async with plain_http_client(url) as http:
        names = []
        for _ in range(count):
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
            names.append(response.headers["x-runtime"])
        return names


def policy_agent(serves_policy: bool = True) -> PolicyAgentState:
    # Like FakeState, it implements only the State methods a router calls.
    return PolicyAgentState(FakeAgent(), serves_policy)  # type: ignore[abstract]


async def test_a_drained_node_gets_no_requests_until_it_is_undrained() -> None:
    state = policy_agent()
    async with router_on(state) as setup:
        watcher = setup.scoring.policy_watcher
        assert await served_by(setup.url, 3) == ["a", "a", "a"], "the near replica, undrained"

        state.policy = state.policy.apply(DrainNode(NEAR, reason="maintenance"))
        await wait_until(lambda: NEAR in watcher.policy.drains, "the router to see the drain")
        assert await served_by(setup.url, 3) == ["b", "b", "b"]

        state.policy = state.policy.apply(UndrainNode(NEAR))
        await wait_until(lambda: not watcher.policy.drains, "the router to see the undrain")
        assert await served_by(setup.url, 3) == ["a", "a", "a"]


async def test_the_policy_survives_a_resync_of_the_replica() -> None:
    state = policy_agent()
    state.policy = PolicySet().apply(DrainNode(NEAR))
    async with router_on(state) as setup:
        scoring = setup.scoring
        await wait_until(lambda: NEAR in scoring.policy_watcher.policy.drains, "the drain")
        state.agent.drop_watchers()  # the router reconnects and swaps in a fresh store
        before = scoring.engine
        await wait_until(lambda: scoring.engine is not before, "the router to resync")
        await wait_until(lambda: scoring.replica.live is not None, "the replica to resync")
        assert await served_by(setup.url, 3) == ["b", "b", "b"]


async def test_an_unreadable_policy_keeps_the_last_good_one() -> None:
    state = policy_agent()
    state.policy = PolicySet().apply(DrainNode(NEAR))
    async with router_on(state) as setup:
        watcher = setup.scoring.policy_watcher
        await wait_until(lambda: NEAR in watcher.policy.drains, "the drain")
        state.document = (7, '{"drains": {"x": {"since": "yesterday"}}, "revision": 7}')
        calls = state.policy_calls
        await wait_until(lambda: state.policy_calls > calls + 1, "the router to poll again")
        assert watcher.policy.revision == 1
        assert NEAR in watcher.policy.drains
        assert await served_by(setup.url, 2) == ["b", "b"]


async def test_an_agent_without_get_policy_leaves_the_router_unrestricted() -> None:
    state = policy_agent(serves_policy=False)
    async with router_on(state) as setup:
        watcher = setup.scoring.policy_watcher
        await wait_until(lambda: watcher.failures >= 3, "the router to retry GetPolicy")
        assert watcher.policy == PolicySet()
        assert await served_by(setup.url, 2) == ["a", "a"]

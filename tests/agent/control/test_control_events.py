"""SubscribeEvents: the journal's numbering, replay, gaps and followers, the events each change
makes, and the stream over the agent's Control API (resume, filter, follow, shutdown)."""

from __future__ import annotations

import anyio
import grpc
import grpc.aio
import pytest

from infermesh.agent.event_sources import model_events, policy_events
from infermesh.agent.events import EventJournal
from infermesh.core.model import ModelState, TargetKey
from infermesh.core.policy import DeletePolicy, DrainNode, Pin, PolicyKind, PolicySet, SetPolicy
from infermesh.core.proto import control_pb2

from .conftest import DEADLINE_S, Mesh

pytestmark = pytest.mark.anyio


def journal_with(count: int, capacity: int = 4096) -> EventJournal:
    journal = EventJournal("n1", capacity=capacity, clock=lambda: 1000.0)
    for index in range(count):
        journal.append("node" if index % 2 else "drain", "joined", f"x{index + 1}")
    return journal


def test_events_are_numbered_from_one_and_replayed_after_a_seq_by_kind() -> None:
    journal = journal_with(4)
    assert [e.seq for e in journal.since(0)] == [1, 2, 3, 4]
    assert [e.seq for e in journal.since(2)] == [3, 4]
    assert journal.since(4) == []
    assert [e.seq for e in journal.since(0, {"node"})] == [2, 4]
    first = journal.since(0)[0]
    assert (first.recorded_by, first.time, first.subject) == ("n1", 1000.0, "x1")


def test_a_subscriber_behind_the_ring_gets_a_gap_first_and_the_ring_stays_bounded() -> None:
    journal = journal_with(5, capacity=3)
    gap, *rest = journal.since(1)
    assert (gap.kind, gap.seq) == ("gap", 2)
    assert gap.message == "events 2 to 2 were dropped (this agent keeps the newest 3)"
    assert [e.seq for e in rest] == [3, 4, 5]
    # Resuming after the gap's seq misses nothing more; from 0 means "the oldest kept".
    assert [e.seq for e in journal.since(gap.seq)] == [3, 4, 5]
    assert [e.seq for e in journal.since(0)] == [3, 4, 5]


def test_a_seq_from_before_a_restart_replays_everything_after_a_gap() -> None:
    journal = journal_with(2)
    gap, *rest = journal.since(9)
    assert (gap.kind, gap.seq) == ("gap", 0)
    assert "restarted" in gap.message
    assert [e.seq for e in rest] == [1, 2]


async def test_a_follower_wakes_for_a_new_event_and_ends_when_the_journal_closes() -> None:
    journal = journal_with(1)
    woke: list[bool] = []

    async def follow() -> None:
        woke.append(await journal.wait_after(1))
        woke.append(await journal.wait_after(2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.wait_all_tasks_blocked()
        journal.append("drain", "drained", "n2")
        await anyio.wait_all_tasks_blocked()
        journal.close()
    assert woke == [True, False]


def test_a_drain_and_a_pin_make_policy_drain_and_model_events() -> None:
    empty = PolicySet()
    drained = empty.apply(DrainNode("n2", "kernel upgrade", 5.0))
    pinned = drained.apply(SetPolicy(PolicyKind.PINS, "llama", Pin(("n1",), 1)))
    unpinned = pinned.apply(DeletePolicy(PolicyKind.PINS, "llama"))

    drain = policy_events(empty, drained)
    assert [(e.kind, e.action, e.subject) for e in drain] == [
        ("policy", "set", "drains/n2"),
        ("drain", "drained", "n2"),
    ]
    assert drain[1].message == "node n2 drained: kernel upgrade"
    assert drain[1].attributes["revision"] == "1"
    pin = policy_events(drained, pinned)
    assert [(e.kind, e.action, e.subject) for e in pin] == [
        ("policy", "set", "pins/llama"),
        ("model", "pinned", "llama"),
    ]
    assert pin[1].message == "model llama pinned to n1 (min_replicas 1)"
    assert [(e.kind, e.action) for e in policy_events(pinned, unpinned)] == [
        ("policy", "deleted"),
        ("model", "unpinned"),
    ]


def test_target_changes_make_model_events() -> None:
    key = TargetKey(model="llama", node="n1", endpoint="http://a:8000")
    first = ModelState(key=key, version=1)
    with_lora = ModelState(key=key, adapters=("sql",), version=2)
    sick = ModelState(key=key, healthy=False, health_reason="HTTP 503", version=3)

    assert [(e.action, e.subject) for e in model_events(None, first)] == [("added", "llama")]
    loaded = model_events(first, with_lora)
    assert [(e.action, e.subject, e.node) for e in loaded] == [("loaded", "sql", "n1")]
    assert loaded[0].message == "LoRA adapter sql loaded on n1 (http://a:8000)"
    assert [(e.action, e.subject) for e in model_events(with_lora, sick)] == [
        ("unhealthy", "llama"),
        ("unloaded", "sql"),
    ]
    gone = ModelState(key=key, loaded=False, version=4)
    assert [e.action for e in model_events(first, gone)] == ["removed"]


async def collect(
    stream: grpc.aio.UnaryStreamCall[control_pb2.SubscribeEventsRequest, control_pb2.Event],
    count: int,
) -> list[control_pb2.Event]:
    events: list[control_pb2.Event] = []
    with anyio.fail_after(DEADLINE_S):
        async for event in stream:
            events.append(event)
            if len(events) == count:
                break
    return events


async def test_the_stream_replays_resumes_filters_and_follows_changes_made_by_others(
    mesh: Mesh,
) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    ops, viewer = mesh.client(agent, "ops"), mesh.client(agent, "grafana")
    await ops.DrainNode(control_pb2.DrainNodeRequest(node="n2", reason="a"), timeout=5)
    await ops.UndrainNode(control_pb2.UndrainNodeRequest(node="n2"), timeout=DEADLINE_S)

    replay = [
        e
        async for e in viewer.SubscribeEvents(
            control_pb2.SubscribeEventsRequest(), timeout=DEADLINE_S
        )
    ]
    assert [(e.seq, e.kind, e.action) for e in replay] == [
        (1, "policy", "set"),
        (2, "drain", "drained"),
        (3, "policy", "deleted"),
        (4, "drain", "undrained"),
    ]
    assert {e.recorded_by for e in replay} == {"n1"}
    resumed = viewer.SubscribeEvents(
        control_pb2.SubscribeEventsRequest(after_seq=2, kinds=["drain"]), timeout=DEADLINE_S
    )
    assert [(e.seq, e.action) async for e in resumed] == [(4, "undrained")]

    following = viewer.SubscribeEvents(
        control_pb2.SubscribeEventsRequest(after_seq=4, follow=True, kinds=["drain"])
    )
    await ops.DrainNode(control_pb2.DrainNodeRequest(node="n3", reason="b"), timeout=5)
    (event,) = await collect(following, 1)
    following.cancel()
    assert (event.seq, event.kind, event.action, event.subject, event.node) == (
        6,
        "drain",
        "drained",
        "n3",
        "n3",
    )
    assert event.attributes["revision"] == "3"


async def test_an_unknown_kind_is_refused_and_a_follower_ends_when_the_agent_stops(
    mesh: Mesh,
) -> None:
    agent = await mesh.agent(mesh.config("n1"))
    viewer = mesh.client(agent, "grafana")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in viewer.SubscribeEvents(
            control_pb2.SubscribeEventsRequest(kinds=["gpu"]), timeout=DEADLINE_S
        ):
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == (
        "kinds: unknown event kind 'gpu'; expected one of: node, model, policy, drain"
    )

    following = viewer.SubscribeEvents(control_pb2.SubscribeEventsRequest(follow=True))
    await following.wait_for_connection()
    agent.request_stop()
    with anyio.fail_after(DEADLINE_S):
        received = [event async for event in following]
    assert received == []
    assert await following.code() == grpc.StatusCode.OK

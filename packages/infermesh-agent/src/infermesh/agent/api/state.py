"""gRPC servicer of `infermesh.v1.State`: push deltas into the store, watch, list and get, list
the gossip mesh's RTT estimates to other nodes, and give the policy scoring follows.

A thin shell over StateStore, an RTT source, a policy source and infermesh.core.convert.
Watchers get a bounded buffer: one that falls behind is ended with RESOURCE_EXHAUSTED (it
reconnects with a snapshot) rather than holding memory for ever. Never blocks the loop and never
mutates state except through the store.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, TypeVar

import grpc

from infermesh.agent.api.status import abort
from infermesh.core.convert import (
    gpu_delta_from_pb,
    gpu_delta_to_pb,
    gpu_key_from_pb,
    gpu_snapshot_delta_pb,
    gpu_state_to_pb,
    model_delta_from_pb,
    model_delta_to_pb,
    model_snapshot_delta_pb,
    model_state_to_pb,
    target_key_from_pb,
)
from infermesh.core.model import GpuStateDelta, ModelStateDelta
from infermesh.core.policy import PolicySet
from infermesh.core.proto import state_pb2, state_pb2_grpc, types_pb2
from infermesh.core.scoring.state import StateStore

__all__ = ["WATCH_BUFFER", "PolicySource", "RttSource", "StateService"]

WATCH_BUFFER = 10_000
"""Deltas a watcher may fall behind by before it is disconnected."""

_D = TypeVar("_D")

RttSource = Callable[[], Mapping[str, float]]
"""Node id -> estimated RTT in seconds from this agent's node, for the nodes with an estimate."""

PolicySource = Callable[[], PolicySet]
"""The policy this agent's scoring follows now (the one its engine was last given)."""

_EMPTY_POLICY = PolicySet()


class _Overflow:
    """Marker queued when a watcher's buffer overflowed."""


_OVERFLOW = _Overflow()


class StateService(state_pb2_grpc.StateServicer):
    """`rtt_source` gives the gossip mesh's RTT estimates (ListNodeRtts); None when gossip is
    off, and ListNodeRtts then answers an empty list. `policy_source` gives the policy scoring
    follows (GetPolicy); None answers the empty policy at revision 0."""

    def __init__(
        self,
        store: StateStore,
        *,
        rtt_source: RttSource | None = None,
        policy_source: PolicySource | None = None,
    ) -> None:
        self.store = store
        self.rtt_source = rtt_source
        self.policy_source = policy_source

    # ------------------------------------------------------------------ push

    async def PushModelDeltas(
        self, request_iterator: AsyncIterator[types_pb2.ModelStateDelta], context: Any
    ) -> state_pb2.PushAck:
        return await _apply_stream(
            "PushModelDeltas",
            request_iterator,
            model_delta_from_pb,
            self.store.apply_model_delta,
            context,
        )

    async def PushGpuDeltas(
        self, request_iterator: AsyncIterator[types_pb2.GpuStateDelta], context: Any
    ) -> state_pb2.PushAck:
        return await _apply_stream(
            "PushGpuDeltas",
            request_iterator,
            gpu_delta_from_pb,
            self.store.apply_gpu_delta,
            context,
        )

    # ------------------------------------------------------------------ watch

    async def WatchModelDeltas(
        self, request: state_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[types_pb2.ModelStateDelta]:
        model = request.model

        def wanted(delta: ModelStateDelta) -> bool:
            return not model or delta.key.model == model

        queue: asyncio.Queue[ModelStateDelta | _Overflow] = asyncio.Queue(WATCH_BUFFER + 1)
        subscription = self.store.subscribe_models(_enqueue(queue, wanted))
        try:
            if request.initial_snapshot:
                for state in self.store.model_states():
                    if not model or state.key.model == model:
                        yield model_snapshot_delta_pb(state)
            while True:
                item = await queue.get()
                if isinstance(item, _Overflow):
                    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, _overflow_message())
                yield model_delta_to_pb(item)
        finally:
            subscription.close()

    async def WatchGpuDeltas(
        self, request: state_pb2.WatchRequest, context: Any
    ) -> AsyncIterator[types_pb2.GpuStateDelta]:
        queue: asyncio.Queue[GpuStateDelta | _Overflow] = asyncio.Queue(WATCH_BUFFER + 1)
        subscription = self.store.subscribe_gpus(_enqueue(queue, lambda _: True))
        try:
            if request.initial_snapshot:
                for state in self.store.gpu_states():
                    yield gpu_snapshot_delta_pb(state)
            while True:
                item = await queue.get()
                if isinstance(item, _Overflow):
                    await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, _overflow_message())
                yield gpu_delta_to_pb(item)
        finally:
            subscription.close()

    # ------------------------------------------------------------------ list / get

    async def ListModelStates(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.ModelStateList:
        states = [
            model_state_to_pb(s)
            for s in self.store.model_states()
            if (not request.model or s.key.model == request.model)
            and (not request.node or s.key.node == request.node)
        ]
        return state_pb2.ModelStateList(states=states)

    async def GetModelState(
        self, request: types_pb2.TargetKey, context: Any
    ) -> types_pb2.ModelState:
        try:
            key = target_key_from_pb(request)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"GetModelState: {exc}")
        state = self.store.get_model(key)
        if state is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no target {key.target_id!r} in this agent's state "
                f"({len(self.store.model_states())} targets known; see ListModelStates)",
            )
        return model_state_to_pb(state)

    async def ListGpuStates(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.GpuStateList:
        states = [
            gpu_state_to_pb(g)
            for g in self.store.gpu_states()
            if not request.node or g.key.node == request.node
        ]
        return state_pb2.GpuStateList(states=states)

    async def GetGpuState(self, request: types_pb2.GpuKey, context: Any) -> types_pb2.GpuState:
        try:
            key = gpu_key_from_pb(request)
        except ValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"GetGpuState: {exc}")
        state = self.store.get_gpu(key)
        if state is None:
            await abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no GPU {key.gpu_uuid!r} on node {key.node!r} in this agent's state "
                f"({len(self.store.gpu_states())} GPUs known; see ListGpuStates)",
            )
        return gpu_state_to_pb(state)

    # ------------------------------------------------------------------ network

    async def ListNodeRtts(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.NodeRttList:
        """The estimated RTT to each node (or to `request.node` only), sorted by node id."""
        rtts = self.rtt_source() if self.rtt_source is not None else {}
        return state_pb2.NodeRttList(
            rtts=[
                state_pb2.NodeRtt(node=node, rtt_s=rtt_s)
                for node, rtt_s in sorted(rtts.items())
                # A nonsensical estimate is left out, as if there were none.
                if node
                and (not request.node or node == request.node)
                and math.isfinite(rtt_s)
                and rtt_s >= 0.0
            ]
        )

    # ------------------------------------------------------------------ policy

    async def GetPolicy(
        self, request: state_pb2.ListRequest, context: Any
    ) -> state_pb2.PolicySnapshot:
        """The policy in force as its document in JSON, with its revision (so a poller can
        skip parsing an unchanged one)."""
        policy = self.policy_source() if self.policy_source is not None else _EMPTY_POLICY
        return state_pb2.PolicySnapshot(
            revision=policy.revision,
            json=json.dumps(policy.to_document(), sort_keys=True, separators=(",", ":")),
        )


def _enqueue(
    queue: asyncio.Queue[_D | _Overflow], wanted: Callable[[_D], bool]
) -> Callable[[_D], None]:
    overflowed = False

    def deliver(delta: _D) -> None:
        nonlocal overflowed
        if overflowed or not wanted(delta):
            return
        if queue.qsize() >= WATCH_BUFFER:
            overflowed = True
            queue.put_nowait(_OVERFLOW)  # the queue holds one slot beyond the buffer for this
            return
        queue.put_nowait(delta)

    return deliver


def _overflow_message() -> str:
    return (
        f"watcher fell more than {WATCH_BUFFER} deltas behind; reconnect with initial_snapshot=true"
    )


_Msg = TypeVar("_Msg")
_Delta = TypeVar("_Delta")


async def _apply_stream(
    rpc: str,
    messages: AsyncIterator[_Msg],
    decode: Callable[[_Msg], _Delta],
    apply: Callable[[_Delta], bool],
    context: Any,
) -> state_pb2.PushAck:
    """Decode and apply a pushed delta stream; a malformed delta aborts with INVALID_ARGUMENT
    naming its position (the ones before it stay applied)."""
    applied = stale = 0
    async for message in messages:
        try:
            delta = decode(message)
        except ValueError as exc:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{rpc}: delta #{applied + stale + 1}: {exc} "
                f"({applied + stale} earlier deltas were accepted)",
            )
        if apply(delta):
            applied += 1
        else:
            stale += 1
    return state_pb2.PushAck(applied=applied, stale=stale)

"""LoadModel/UnloadModel: on this node through a runtime adapter's RuntimeControl, or on another
node by forwarding the call to that node's agent.

`RuntimeOps.run` picks the runtime, calls it with a timeout, records a `model` event in the
journal (loaded, unloaded, load_failed, unload_failed; attribute `by` = the caller) and returns
the reply, or raises `OperationError` with the gRPC status and a message an operator can act on:
the runtime's own words, never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio
import attrs
import grpc

from infermesh.agent.certs import Identity
from infermesh.agent.events import EventJournal
from infermesh.core.contracts import RuntimeControl
from infermesh.core.logging import get_logger
from infermesh.core.proto import control_pb2

__all__ = [
    "DEFAULT_OPERATION_TIMEOUT_S",
    "LocalRuntime",
    "OperationError",
    "RuntimeOps",
    "pick_runtime",
    "runtime_error_status",
]

log = get_logger("infermesh.agent.runtime_ops")

DEFAULT_OPERATION_TIMEOUT_S = 120.0
"""How long a load or unload may take on the runtime before the call fails."""

Op = Literal["load", "unload"]

Forward = Callable[
    [Op, str, control_pb2.LoadModelRequest | control_pb2.UnloadModelRequest, Identity],
    Awaitable[control_pb2.ModelOperationReply],
]
"""Sends a LoadModel/UnloadModel to another node's agent on behalf of the caller."""


class OperationError(Exception):
    """A load or unload could not be done: the gRPC status and the message to send."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@attrs.frozen
class LocalRuntime:
    """A runtime of this node whose adapter can load and unload models."""

    name: str
    url: str
    control: RuntimeControl


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _same_url(a: str, b: str) -> bool:
    """Base URLs match with or without a trailing slash or OpenAI `/v1` suffix (the config's
    `url` and a target's endpoint may differ so)."""
    return _base(a) == _base(b)


def pick_runtime(node: str, runtimes: Sequence[LocalRuntime], wanted: str) -> LocalRuntime:
    """The runtime named by `wanted` (its base URL or config name), or the only one when
    `wanted` is empty; OperationError listing the candidates otherwise."""
    listed = ", ".join(r.url for r in runtimes)
    if wanted:
        for runtime in runtimes:
            if _same_url(runtime.url, wanted) or runtime.name == wanted:
                return runtime
        raise OperationError(
            grpc.StatusCode.NOT_FOUND,
            f"node {node} has no runtime {wanted!r} that can load models; "
            f"its runtimes with model control: {listed or 'none'}",
        )
    if len(runtimes) == 1:
        return runtimes[0]
    if not runtimes:
        raise OperationError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"node {node} has no runtime that can load or unload models "
            "(none of its [[runtimes]] adapters supports RuntimeControl)",
        )
    raise OperationError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"node {node} has {len(runtimes)} runtimes that can load models; choose one with "
        f"runtime: {listed}",
    )


_HTTP_STATUS_RE = re.compile(r"\bHTTP (\d{3})\b")


def runtime_error_status(message: str) -> grpc.StatusCode:
    """The gRPC status for a runtime's refusal, read from the adapter's message (`HTTP 404`:
    NOT_FOUND, e.g. an unknown adapter; other 4xx: FAILED_PRECONDITION, e.g. already loaded,
    no free slot, LoRA routes off; anything else: UNAVAILABLE, the runtime did not answer)."""
    match = _HTTP_STATUS_RE.search(message)
    if match is None:
        return grpc.StatusCode.UNAVAILABLE
    status = int(match[1])
    if status == 404 and "routes are missing" not in message:
        return grpc.StatusCode.NOT_FOUND
    if 400 <= status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNAVAILABLE


class RuntimeOps:
    """Loads and unloads models on this node's runtimes, or forwards to the node that runs it."""

    def __init__(
        self,
        node_id: str,
        runtimes: Sequence[LocalRuntime],
        journal: EventJournal,
        *,
        forward: Forward | None = None,
        timeout_s: float = DEFAULT_OPERATION_TIMEOUT_S,
    ) -> None:
        self.node_id = node_id
        self.runtimes = tuple(runtimes)
        self.journal = journal
        self._forward = forward
        self.timeout_s = timeout_s

    async def run(
        self,
        op: Op,
        request: control_pb2.LoadModelRequest | control_pb2.UnloadModelRequest,
        caller: Identity,
    ) -> control_pb2.ModelOperationReply:
        if not request.node:
            raise OperationError(
                grpc.StatusCode.INVALID_ARGUMENT, "node: required (the node whose runtime to use)"
            )
        if not request.model:
            raise OperationError(grpc.StatusCode.INVALID_ARGUMENT, "model: required")
        if request.node != self.node_id:
            if self._forward is None:
                raise OperationError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"node {request.node} is not this agent's node ({self.node_id}) and this "
                    "agent cannot forward the call (it has no gossip membership)",
                )
            return await self._forward(op, request.node, request, caller)
        runtime = pick_runtime(self.node_id, self.runtimes, request.runtime)
        source = request.source if isinstance(request, control_pb2.LoadModelRequest) else ""
        return await self._run_local(op, runtime, request.model, source, caller)

    async def _run_local(
        self, op: Op, runtime: LocalRuntime, model: str, source: str, caller: Identity
    ) -> control_pb2.ModelOperationReply:
        done = "loaded" if op == "load" else "unloaded"
        attributes = {"by": caller.uri, "endpoint": runtime.url, "runtime": runtime.name}
        if source:
            attributes["source"] = source
        try:
            with anyio.fail_after(self.timeout_s):
                if op == "load":
                    await runtime.control.load(model, source)
                else:
                    await runtime.control.unload(model)
        except TimeoutError:
            error = OperationError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"{op} of {model} on {runtime.url} did not finish in {self.timeout_s:g}s",
            )
        except Exception as exc:
            message = str(exc) or type(exc).__name__
            error = OperationError(runtime_error_status(message), message)
        else:
            message = f"{done} {model} on {runtime.url}"
            self.journal.append(
                "model", done, model, self.node_id, f"{message} (by {caller})", attributes
            )
            log.info("model operation", op=op, model=model, runtime=runtime.url, by=caller.uri)
            return control_pb2.ModelOperationReply(
                node=self.node_id, model=model, runtime=runtime.url, message=message
            )
        self.journal.append(
            "model",
            f"{op}_failed",
            model,
            self.node_id,
            f"{op} of {model} on {runtime.url} failed: {error}",
            {**attributes, "error": str(error)},
        )
        log.warning("model operation failed", op=op, model=model, error=str(error))
        raise error

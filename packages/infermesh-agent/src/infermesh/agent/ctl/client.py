"""The CLI's connection to an agent's Control API: a mutual-TLS channel from the resolved settings,
and calls whose failures come back as `CtlError`s (see `rpc_errors.rpc_error`).

Synchronous on purpose: a command makes one or a few calls and then exits. Imported only when a
command runs (`options.run`, after it quiets gRPC core's logging), so `infermesh --help` does
not load gRPC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import grpc

from infermesh.agent.ctl.credentials import client_credentials
from infermesh.agent.ctl.errors import CtlError
from infermesh.agent.ctl.profile import ConnectionSettings
from infermesh.agent.ctl.rpc_errors import CallTarget, rpc_error
from infermesh.core.proto import control_pb2, control_pb2_grpc

__all__ = ["ControlClient"]

Reply = TypeVar("Reply")


class ControlClient:
    """One channel to one agent; use as a context manager so the channel is closed."""

    def __init__(self, settings: ConnectionSettings) -> None:
        self.settings = settings
        self._target = CallTarget(
            endpoint=settings.endpoint,
            ca=settings.ca,
            cert=settings.cert,
            timeout_s=settings.timeout_s,
        )
        credentials = client_credentials(settings.ca, settings.cert, settings.key)
        self._channel = grpc.secure_channel(settings.endpoint, credentials)
        self.stub = control_pb2_grpc.ControlStub(self._channel)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def call(self, method: Callable[..., Reply], request: Any) -> Reply:
        """`method(request)` with the deadline of `--timeout`; a failure is a CtlError."""
        try:
            return method(request, timeout=self.settings.timeout_s)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def events(self, request: control_pb2.SubscribeEventsRequest) -> Iterator[control_pb2.Event]:
        """The SubscribeEvents stream. Without `follow` the whole stream has the `--timeout`
        deadline; with it the stream stays open until the agent ends it or the user stops."""
        timeout = None if request.follow else self.settings.timeout_s
        try:
            yield from self.stub.SubscribeEvents(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> CtlError:
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
        return rpc_error(code, details, self._target)

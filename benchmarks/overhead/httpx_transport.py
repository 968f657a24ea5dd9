"""An httpx (or httpx2) upstream transport, so the benchmark can compare it with aiohttp.

It implements the same `Transport` contract as the router's `openai-http` transport: body bytes
sent unchanged, headers returned as soon as they arrive, the body relayed as it arrives (raw, not
decoded), never a retry, and every failure to reach or read a runtime an `UpstreamError`.
Benchmark-only: InferMesh itself ships the aiohttp transport.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import ModuleType
from typing import Any

from infermesh.core.contracts import Transport, TransportContext, UpstreamError
from infermesh.core.hookspecs import RegisterTransport, hookimpl

__all__ = [
    "MODULES",
    "HttpxTransport",
    "HttpxUpstreamResponse",
    "infermesh_register_transports",
    "transport_name",
]

MODULES = ("httpx", "httpx2")

# Same idle-keep-alive margin as the aiohttp transport: vLLM (uvicorn) drops idle sockets at 5 s.
KEEPALIVE_S = 4.0


def transport_name(module_name: str) -> str:
    """The name this plugin registers the transport under (`httpx-http`, `httpx2-http`)."""
    return f"{module_name}-http"


@hookimpl
def infermesh_register_transports(register: RegisterTransport) -> None:
    """This module is a plugin: `PluginHost.load(extra=[("bench-httpx", module)])`.

    The factories import their client library only when called, so registering both costs
    nothing where one of them is not installed.
    """

    def factory_for(module_name: str) -> Callable[[TransportContext], Transport]:
        def factory(context: TransportContext) -> Transport:
            return HttpxTransport(context, module_name=module_name)

        return factory

    for module_name in MODULES:
        register(transport_name(module_name), factory_for(module_name))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class HttpxUpstreamResponse:
    """A runtime response whose headers have arrived; the body streams through `chunks()`."""

    __slots__ = ("_errors", "_response", "_tasks", "headers", "status", "url")

    def __init__(
        self, response: Any, url: str, errors: tuple[type[BaseException], ...], tasks: set[Any]
    ) -> None:
        self._response = response
        self._errors = errors
        self._tasks = tasks
        self.url = url
        self.status: int = response.status_code
        self.headers: Sequence[tuple[str, str]] = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in response.headers.raw
        ]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except self._errors as exc:
            raise UpstreamError(f"{self.url}: body interrupted: {_describe(exc)}") from exc

    async def read(self) -> bytes:
        try:
            body: bytes = await self._response.aread()
        except self._errors as exc:
            raise UpstreamError(f"{self.url}: body interrupted: {_describe(exc)}") from exc
        return body

    def release(self) -> None:
        """httpx closes a response read to the end by itself; close any other one off-path."""
        if self._response.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._response.aclose())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class HttpxTransport:
    """Forwards requests to runtimes by URL over one pooled `AsyncClient` of `module_name`."""

    def __init__(self, context: TransportContext, module_name: str = "httpx") -> None:
        self.context = context
        self._module: ModuleType = importlib.import_module(module_name)
        self._errors: tuple[type[BaseException], ...] = (
            self._module.TransportError,
            self._module.TimeoutException,
            OSError,
        )
        self._client: Any = None
        self._closing: set[Any] = set()

    def _new_client(self) -> Any:
        httpx = self._module
        limits = httpx.Limits(
            max_connections=self.context.max_connections,
            max_keepalive_connections=self.context.max_connections,
            keepalive_expiry=KEEPALIVE_S,
        )
        timeout = httpx.Timeout(
            connect=self.context.connect_timeout_s,
            read=self.context.read_timeout_s,
            write=self.context.read_timeout_s,
            pool=self.context.connect_timeout_s,
        )
        return httpx.AsyncClient(
            limits=limits, timeout=timeout, follow_redirects=False, trust_env=False
        )

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
    ) -> HttpxUpstreamResponse:
        client = self._client
        if client is None:
            client = self._client = self._new_client()
        try:
            request = client.build_request(method, url, headers=list(headers), content=body)
            response = await client.send(request, stream=True)
        except self._errors as exc:
            raise UpstreamError(f"{url}: {_describe(exc)}") from exc
        return HttpxUpstreamResponse(response, url, self._errors, self._closing)

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

"""A tiny aiohttp server on 127.0.0.1 answering each path with what the test sets.

Test scaffolding only: `routes[path] = (status, body)`; a path not set answers 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


class RecordedRuntime:
    def __init__(self, routes: dict[str, tuple[int, bytes | str]]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.headers)))
        status, body = self.routes.get(request.path, (404, "not found"))
        if isinstance(body, str):
            body = body.encode()
        return web.Response(status=status, body=body, content_type="text/plain")


@asynccontextmanager
async def recorded_runtime(
    routes: dict[str, tuple[int, bytes | str]],
) -> AsyncIterator[RecordedRuntime]:
    server = RecordedRuntime(routes)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

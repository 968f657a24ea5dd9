"""A tiny aiohttp server on 127.0.0.1 answering each path with what the test sets.

Test scaffolding only: GET `routes[path] = (status, body)`, and POST `/v1/chat/completions`
answers one fixed OpenAI chat completion naming `reply`; any other path answers 404.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web


class RecordedRuntime:
    def __init__(self, routes: dict[str, tuple[int, bytes | str]]) -> None:
        self.routes = routes
        self.reply = "hello from the recorded runtime"
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{path:.*}", self._answer)
        app.router.add_post("/v1/chat/completions", self._chat)
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

    async def _chat(self, request: web.Request) -> web.Response:
        asked = await request.json()
        self.requests.append((request.path, dict(request.headers)))
        message = {"role": "assistant", "content": self.reply}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1732780000,
                "model": asked["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
            }
        )


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

"""A tiny aiohttp server on 127.0.0.1 that answers like vLLM with pages chosen by the test.

Test scaffolding only: it serves whatever `metrics_text`, `models_json` and `health_status` hold
now, and implements the LoRA load/unload and completions routes as far as the adapter uses them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from aiohttp import web

from tests.vllm.pages import MODEL, models_json, render_page


class FakeVllmServer:
    def __init__(self) -> None:
        self.metrics_text = render_page()
        self.adapters: list[str] = []
        self.health_status = 200
        self.lora_routes = True
        self.stall = anyio.Event()
        self.stall_paths: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        app.router.add_post("/v1/completions", self._completions)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        address = self._runner.addresses[0]
        self.port = int(address[1])

    def bodies(self, path: str) -> list[Any]:
        """JSON bodies of the requests received on `path`, oldest first."""
        return [body for _, at, _, body in self.requests if at == path]

    async def stop(self) -> None:
        self.stall.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _record(self, request: web.Request) -> Any:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.headers), body))
        if request.path in self.stall_paths:
            await self.stall.wait()
        return body

    async def _metrics(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(text=self.metrics_text, content_type="text/plain")

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(
            text=models_json(adapters=self.adapters), content_type="application/json"
        )

    async def _health(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(status=self.health_status)

    async def _load(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if not self.lora_routes:
            return web.json_response({"detail": "Not Found"}, status=404)
        if body["lora_name"] in self.adapters:
            message = f"The lora adapter '{body['lora_name']}' has already been loaded."
            return _error(message, 400)
        self.adapters.append(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if body["lora_name"] not in self.adapters:
            return _error(f"The lora adapter '{body['lora_name']}' cannot be found.", 404)
        self.adapters.remove(body["lora_name"])
        return web.Response(text="Success")

    async def _completions(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if body["model"] not in (MODEL, *self.adapters):
            return _error(f"The model `{body['model']}` does not exist.", 404)
        choice = {"index": 0, "text": " world", "finish_reason": "length"}
        return web.json_response({"object": "text_completion", "choices": [choice]})


def _error(message: str, status: int) -> web.Response:
    payload = {"error": {"message": message, "type": "BadRequestError", "code": status}}
    return web.Response(text=json.dumps(payload), status=status, content_type="application/json")


@asynccontextmanager
async def running_server() -> AsyncIterator[FakeVllmServer]:
    server = FakeVllmServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()

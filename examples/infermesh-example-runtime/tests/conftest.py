"""A tiny llama-server emulator on 127.0.0.1 speaking the pages the adapter reads.

Serves `/health`, `/props`, `/slots`, `/metrics` (llama.cpp's names), `/v1/models` and a
non-streaming `/v1/chat/completions` that holds one slot while it runs. A request beyond the
slots waits (llama.cpp defers it) and counts in `llamacpp:requests_deferred`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator

import attrs
import pytest
from aiohttp import web


@attrs.define
class LlamaServer:
    """The emulator's state; tests change it to make the server busy, loading or odd."""

    alias: str = "acme/tiny-llama-GGUF"
    total_slots: int = 2
    metrics: bool = True
    """False answers /metrics with 501, like a server started without --metrics."""
    loading: bool = False
    """True answers /health with 503 "Loading model"."""
    busy: int = 0
    deferred: int = 0
    release: asyncio.Event = attrs.field(factory=asyncio.Event)
    """Completions hold their slot until this is set."""
    slot_freed: asyncio.Condition = attrs.field(factory=asyncio.Condition)
    url: str = ""
    served: int = 0
    _ids: itertools.count[int] = attrs.field(factory=itertools.count)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/props", self.props)
        app.router.add_get("/slots", self.slots)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request: web.Request) -> web.Response:
        if self.loading:
            error = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
            return web.json_response({"error": error}, status=503)
        return web.json_response({"status": "ok"})

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "model_alias": self.alias,
                "model_path": f"/models/{self.alias.split('/')[-1]}.gguf",
                "total_slots": self.total_slots,
                "default_generation_settings": {"n_ctx": 4096},
            }
        )

    async def slots(self, request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"id": i, "id_task": -1, "n_ctx": 4096, "is_processing": i < self.busy}
                for i in range(self.total_slots)
            ]
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        if not self.metrics:
            error = {"code": 501, "message": "This server does not support metrics endpoint."}
            return web.json_response({"error": error}, status=501)
        lines = [
            "# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.",
            "# TYPE llamacpp:kv_cache_usage_ratio gauge",
            f"llamacpp:kv_cache_usage_ratio {0.25 * self.busy}",
            "# HELP llamacpp:requests_processing Number of requests processing.",
            "# TYPE llamacpp:requests_processing gauge",
            f"llamacpp:requests_processing {self.busy}",
            "# HELP llamacpp:requests_deferred Number of requests deferred.",
            "# TYPE llamacpp:requests_deferred gauge",
            f"llamacpp:requests_deferred {self.deferred}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.alias, "object": "model", "owned_by": "llamacpp", "created": 0}
        return web.json_response({"object": "list", "data": [card]})

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        async with self.slot_freed:
            if self.busy >= self.total_slots:
                self.deferred += 1
                await self.slot_freed.wait_for(lambda: self.busy < self.total_slots)
                self.deferred -= 1
            self.busy += 1
        try:
            await self.release.wait()
        finally:
            async with self.slot_freed:
                self.busy -= 1
                self.slot_freed.notify()
        self.served += 1
        message = {"role": "assistant", "content": "hello from llama-server"}
        answer = {
            "id": f"chatcmpl-llamacpp-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.alias),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        }
        return web.Response(text=json.dumps(answer), content_type="application/json")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def llama_server() -> AsyncIterator[LlamaServer]:
    """A running emulated llama-server whose completions finish at once (until a test clears
    `release`)."""
    server = LlamaServer()
    server.release.set()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()

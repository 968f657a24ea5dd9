"""The forwarder's hedging, 429 retries, retry budget and circuit breakers, in both scoring modes,
against in-process runtimes that stall before their first byte or answer 429."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web

from infermesh.core.config import BreakerConfig, HedgingConfig, RetryConfig
from infermesh.router.local_scoring import LocalScoring

from .conftest import Mesh, target_id, wait_until

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


class OddRuntime:
    """A runtime that stalls before its first byte (until cancelled) or answers 429."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = 0
        self.cancelled = 0
        self.endpoint = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.received += 1
        if self.mode == "429":
            return web.json_response({"error": {"message": "busy"}}, status=429)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.endpoint = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def odd_runtime(mode: str) -> AsyncIterator[OddRuntime]:
    runtime = OddRuntime(mode)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["json", "stream"])
async def test_a_stalled_first_attempt_is_hedged_and_the_loser_cancelled_upstream(
    mesh: Mesh, body: dict[str, object]
) -> None:
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.05))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        response = await mesh.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert response.headers["x-runtime"] == "b"
        await wait_until(lambda: stall.cancelled == 1, "the stalled attempt to be cancelled")
        outcomes = await mesh.agent.wait_outcomes(2)
    loser = next(o for o in outcomes if o.target_id == target_id("m", stall.endpoint))
    assert (loser.ok, loser.status) == (True, 499), "a lost race is not the target's failure"
    assert "cancelled" in loser.error
    assert mesh.app.metrics.hedges["fired"] == mesh.app.metrics.hedges["won"] == 1


@pytest.mark.parametrize("body", [CHAT, STREAM], ids=["json", "stream"])
async def test_a_non_idempotent_request_is_not_hedged_and_a_client_leaving_cancels_it(
    mesh: Mesh, body: dict[str, object]
) -> None:
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.01))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        call = asyncio.ensure_future(
            mesh.http.post(
                "/v1/chat/completions", json=body, headers={"x-infermesh-idempotent": "false"}
            )
        )
        await wait_until(lambda: stall.received == 1, "the stalling runtime to get the request")
        await asyncio.sleep(0.05)  # well past the hedge delay
        assert mesh.app.metrics.hedges["fired"] == 0
        assert len(mesh.b.received) == 0
        call.cancel()  # the client leaves before the first byte
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: stall.cancelled == 1, "the upstream request to be cancelled")
    (outcome,) = await mesh.agent.wait_outcomes(1)
    assert (outcome.ok, outcome.status) == (True, 499)


async def test_no_hedge_after_the_first_token(mesh: Mesh) -> None:
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.3))
    mesh.a.release_rest.clear()  # a sends its first token, then holds the rest
    async with mesh.http.stream("POST", "/v1/chat/completions", json=STREAM) as response:
        chunks = response.aiter_bytes()
        assert b"Hel" in await anext(chunks)
        await asyncio.sleep(0.35)  # past the hedge delay, with the first token already out
        mesh.a.release_rest.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest.endswith(b"data: [DONE]\n\n")
    assert mesh.app.metrics.hedges["fired"] == 0
    assert len(mesh.b.received) == 0


async def test_a_429_is_retried_elsewhere_and_relayed_when_nothing_else_answers(
    mesh: Mesh,
) -> None:
    mesh.app.forwarder.configure(hedging=HedgingConfig(enabled=False))  # no race with the 429
    async with odd_runtime("429") as busy:
        await mesh.route("m", [busy.endpoint, mesh.b.endpoint])
        response = await mesh.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.headers["x-runtime"] == "b"
        assert mesh.app.metrics.retries == {"http_429": 1}
        await mesh.route("m", [busy.endpoint])
        response = await mesh.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 429
        assert orjson.loads(response.content)["error"]["message"] == "busy"


async def test_an_ejected_target_is_skipped_until_its_probe(mesh: Mesh) -> None:
    mesh.app.forwarder.configure(
        breaker=BreakerConfig(consecutive_failures=1, ejection_s=3600.0),
        hedging=HedgingConfig(enabled=False),
    )
    mesh.a.mode = "error500"
    for _ in range(3):
        response = await mesh.http.post("/v1/chat/completions", json=CHAT)
        assert response.headers["x-runtime"] == "b"
    assert len(mesh.a.received) == 1, "after one failure a is ejected and not tried again"
    page = mesh.app.metrics.render().decode()
    opened = (
        "infermesh_router_breaker_transitions_total{"
        f'target="{target_id("m", mesh.a.endpoint)}",to_state="open"}} 1.0'
    )
    assert opened in page


async def test_the_retry_budget_stops_retries_when_spent(mesh: Mesh) -> None:
    mesh.app.forwarder.configure(
        retries=RetryConfig(max_tokens=3, token_ratio=0.0),
        breaker=BreakerConfig(enabled=False),
        hedging=HedgingConfig(enabled=False),
    )
    mesh.a.mode = "error500"
    first = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert first.status_code == 200  # 3 tokens, 2 after the failure (> 1.5): retried
    second = await mesh.http.post("/v1/chat/completions", json=CHAT)
    assert second.status_code == 502  # 1 token after this failure: no retry
    assert mesh.app.metrics.retries_denied == 1


async def test_a_policy_that_disables_hedging_for_the_model_is_followed(local_mesh: Mesh) -> None:
    mesh = local_mesh
    assert isinstance(mesh.app.scoring, LocalScoring)
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.01))
    document = {"hedging": {"m-off": {"model": "m", "enabled": False}}}
    mesh.app.scoring.policy_watcher.received(7, json.dumps(document))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        call = asyncio.ensure_future(mesh.http.post("/v1/chat/completions", json=STREAM))
        await wait_until(lambda: stall.received == 1, "the stalling runtime to get the request")
        await asyncio.sleep(0.05)  # well past the configured hedge delay
        assert mesh.app.metrics.hedges["fired"] == 0
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call


async def test_agent_mode_follows_the_policy_that_disables_hedging(agent_mesh: Mesh) -> None:
    mesh = agent_mesh
    watcher = mesh.app.admission.policy_watcher
    assert watcher is not None  # agent mode: the admission gate polls GetPolicy itself
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.01))
    document = {"hedging": {"m-off": {"model": "m", "enabled": False}}}
    watcher.received(7, json.dumps(document))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        call = asyncio.ensure_future(mesh.http.post("/v1/chat/completions", json=STREAM))
        await wait_until(lambda: stall.received == 1, "the stalling runtime to get the request")
        await asyncio.sleep(0.05)  # well past the configured hedge delay
        assert mesh.app.metrics.hedges["fired"] == 0
        assert mesh.b.received == []
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    # The policy lifted: the same stall is hedged on the next-ranked target.
    watcher.received(8, json.dumps({"hedging": {}}))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        response = await mesh.http.post("/v1/chat/completions", json=STREAM)
        assert response.status_code == 200
        assert mesh.app.metrics.hedges["fired"] == 1


async def test_latency_histograms_and_outcomes_per_model_and_slo_class(mesh: Mesh) -> None:
    mesh.a.release_rest.clear()  # the rest of the stream comes after the first token is out
    headers = {"x-infermesh-slo": "latency"}
    async with mesh.http.stream(
        "POST", "/v1/chat/completions", json=STREAM, headers=headers
    ) as response:
        chunks = response.aiter_bytes()
        assert b"Hel" in await anext(chunks)
        mesh.a.release_rest.set()
        assert b"".join([chunk async for chunk in chunks]).endswith(b"[DONE]\n\n")
    unknown = await mesh.http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    assert unknown.status_code == 404
    labels = 'model="m",slo_class="latency"'
    ok = 'infermesh_router_outcomes_total{model="m",outcome="ok",slo_class="latency"} 1.0'
    # The router counts a request once its handler returns, just after the client's last byte.
    await wait_until(lambda: ok in mesh.app.metrics.render().decode(), "the outcome to count")
    page = mesh.app.metrics.render().decode()
    for family in ("time_to_first_token", "e2e_latency"):
        assert f"infermesh_router_{family}_seconds_count{{{labels}}} 1.0" in page
    gaps = f"infermesh_router_inter_token_latency_seconds_count{{{labels}}} "
    assert float(page.split(gaps, 1)[1].split("\n", 1)[0]) >= 1, "chunk gaps of the stream"
    assert (
        'infermesh_router_outcomes_total{model="other",outcome="unknown_model",'
        'slo_class="standard"} 1.0'
    ) in page
    chosen = target_id("m", mesh.a.endpoint)
    assert f'infermesh_router_target_choices_total{{target="{chosen}"}} 1.0' in page


async def test_no_hedge_while_the_fleet_is_saturated(local_mesh: Mesh) -> None:
    mesh = local_mesh
    mesh.app.forwarder.configure(hedging=HedgingConfig(default_delay_s=0.01))
    async with odd_runtime("stall") as stall:
        await mesh.route("m", [stall.endpoint, mesh.b.endpoint])
        # Both replicas nearly out of KV cache: admission sheds batch, so no hedges are sent.
        await mesh.publish(
            *(
                mesh.agent.state_of("m", endpoint, kv_cache_usage=0.98 + 0.01 * rank)
                for rank, endpoint in enumerate([stall.endpoint, mesh.b.endpoint])
            )
        )
        headers = {"x-infermesh-slo": "latency"}  # never shed by saturation
        call = asyncio.ensure_future(
            mesh.http.post("/v1/chat/completions", json=STREAM, headers=headers)
        )
        await wait_until(
            lambda: mesh.app.metrics.hedges["denied_saturated"] == 1, "the hedge to be denied"
        )
        # The hedge timer (10 ms) may fire before the first attempt's request reaches the runtime.
        await wait_until(lambda: stall.received == 1, "the stalling runtime to get the request")
        assert mesh.app.metrics.hedges["fired"] == 0
        assert len(mesh.b.received) == 0
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

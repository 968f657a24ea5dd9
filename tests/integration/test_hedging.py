"""Hedging, retries and failure handling with real processes: emulated vLLM replicas that stall,
answer 429 or die, behind a real agent and router. Counts come from the router's and the
emulators' /metrics, never from timings."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.dev.harness import LocalMesh, ManagedProcess, ReplicaSpec

from .conftest import MODEL, spec, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TIMEOUT = aiohttp.ClientTimeout(total=60)


def chat(text: str, *, stream: bool = False, max_tokens: int = 4) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


async def samples(url: str) -> dict[str, float]:
    """A /metrics page as `name{k=v,...}` -> value (labels sorted; `name{}` without labels)."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.get(url) as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def emulator_count(mesh: LocalMesh, replica: str, counter: str) -> float:
    url = next(r.url for r in mesh.replicas if r.name == replica)
    return (await samples(f"{url}/metrics")).get(f"infermesh_emulator_{counter}_total{{}}", 0.0)


async def router_count(mesh: LocalMesh, key: str) -> float:
    return (await samples(f"{mesh.router_url}/metrics")).get(key, 0.0)


def emulator(mesh: LocalMesh, name: str) -> ManagedProcess:
    return next(p for p in mesh.processes if p.name == f"emulator {name}")


def kill(process: ManagedProcess) -> None:
    assert process.process is not None
    process.process.send_signal(signal.SIGKILL)


async def post(
    session: aiohttp.ClientSession, mesh: LocalMesh, body: dict[str, object], **headers: str
) -> tuple[int, bytes]:
    async with session.post(
        f"{mesh.router_url}/v1/chat/completions", json=body, headers=headers
    ) as resp:
        return resp.status, await resp.read()


# ----------------------------------------------------------------------------- hedging


@pytest.fixture(scope="module")
async def stalling_mesh() -> AsyncIterator[LocalMesh]:
    """`stall` holds half its requests 20 s before the first token; `ok` never stalls."""
    async with LocalMesh(
        spec(
            ReplicaSpec("h100", "stall", extra_args=("--stall-prob", "0.5", "--stall-s", "20")),
            ReplicaSpec("h100", "ok"),
            # A short default delay: the test is over before the TTFT quantile is learnt.
            extra_config=(
                "[router.hedging]\ndefault_delay_s = 0.2\nmin_samples = 1000\n"
                "budget_ratio = 0.1\nbudget_burst = 2.0"
            ),
        )
    ) as running:
        yield running


async def test_hedges_win_on_another_replica_within_the_budget(stalling_mesh: LocalMesh) -> None:
    mesh = stalling_mesh
    sent = 0
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def won() -> bool:
            nonlocal sent
            batch = [chat(f"question {sent + i}", stream=True) for i in range(4)]
            sent += len(batch)
            results = await asyncio.gather(*(post(session, mesh, body) for body in batch))
            statuses.extend(status for status, _ in results)
            return await router_count(mesh, "infermesh_router_hedges_total{event=won}") >= 2

        await wait_for(won, "two hedges to win", timeout_s=90)
    assert statuses == [200] * sent
    fired = await router_count(mesh, "infermesh_router_hedges_total{event=fired}")
    # The budget as configured: 0.1 token per request, 2 saved up at the start, one per hedge.
    assert fired <= 0.1 * sent + 2
    upstream = sum([await emulator_count(mesh, name, "requests") for name in ("stall", "ok")])
    assert upstream == sent + fired
    # Each winning hedge's stalled first attempt was cancelled, and the stalling emulator saw it.

    async def losers_aborted() -> bool:
        return await emulator_count(mesh, "stall", "cancelled") >= 2

    await wait_for(losers_aborted, "the stalling replica to see its requests cancelled")
    ok = f"infermesh_router_outcomes_total{{model={MODEL},outcome=ok,slo_class=standard}}"
    assert await router_count(mesh, ok) >= sent


async def test_a_request_marked_non_idempotent_is_never_hedged(stalling_mesh: LocalMesh) -> None:
    mesh = stalling_mesh
    before = await router_count(mesh, "infermesh_router_hedges_total{event=fired}")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        results = await asyncio.gather(
            *(
                post(session, mesh, chat(f"once {i}"), **{"x-infermesh-idempotent": "false"})
                for i in range(2)
            )
        )
    assert [status for status, _ in results] == [200, 200]
    assert await router_count(mesh, "infermesh_router_hedges_total{event=fired}") == before


async def test_a_client_that_disconnects_cancels_the_upstream_request(
    stalling_mesh: LocalMesh,
) -> None:
    mesh = stalling_mesh
    names = ("stall", "ok")

    async def total(counter: str) -> float:
        return sum([await emulator_count(mesh, name, counter) for name in names])

    requests_before, cancelled_before = await total("requests"), await total("cancelled")
    body = chat("a very long story", stream=True, max_tokens=5000)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        call = asyncio.ensure_future(
            post(session, mesh, body, **{"x-infermesh-idempotent": "false"})
        )

        async def arrived() -> bool:
            return await total("requests") > requests_before

        await wait_for(arrived, "the request to reach an emulator")
        call.cancel()  # the client goes away: its connection to the router closes
        with pytest.raises(asyncio.CancelledError):
            await call

    async def cancelled() -> bool:
        return await total("cancelled") > cancelled_before

    await wait_for(cancelled, "the emulator to see the cancellation")


# ----------------------------------------------------------------------------- 429 and retries


@pytest.fixture
async def limited_mesh() -> AsyncIterator[LocalMesh]:
    """`limited` answers every request 429; `ok` answers normally."""
    async with LocalMesh(
        spec(
            ReplicaSpec("h100", "limited", extra_args=("--fail-prob", "1", "--fail-status", "429")),
            ReplicaSpec("h100", "ok"),
        )
    ) as running:
        yield running


async def test_a_runtime_answering_429_is_retried_elsewhere(limited_mesh: LocalMesh) -> None:
    mesh = limited_mesh
    statuses: list[int] = []
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def limited_hit() -> bool:
            results = await asyncio.gather(*(post(session, mesh, chat(f"q{i}")) for i in range(4)))
            statuses.extend(status for status, _ in results)
            return await emulator_count(mesh, "limited", "faults") >= 1

        await wait_for(limited_hit, "a request to reach the replica that answers 429")
    assert set(statuses) == {200}
    faults = await emulator_count(mesh, "limited", "faults")
    assert await router_count(mesh, "infermesh_router_retries_total{reason=http_429}") == faults


# ----------------------------------------------------------------------------- deaths


@pytest.fixture
async def doomed_mesh() -> AsyncIterator[LocalMesh]:
    """`doomed` holds every request 60 s before its first byte; `ok` answers normally."""
    async with LocalMesh(
        spec(
            ReplicaSpec("h100", "doomed", extra_args=("--stall-prob", "1", "--stall-s", "60")),
            ReplicaSpec("a10", "ok"),
            extra_config="[router.hedging]\nenabled = false",
        )
    ) as running:
        yield running


async def test_killed_before_the_first_byte_then_mid_stream(doomed_mesh: LocalMesh) -> None:
    mesh = doomed_mesh
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        calls = [asyncio.ensure_future(post(session, mesh, chat(f"q{i}"))) for i in range(4)]

        async def stalled() -> bool:
            return await emulator_count(mesh, "doomed", "stalls") >= 1

        await wait_for(stalled, "a request to stall on the doomed replica")
        kill(emulator(mesh, "doomed"))
        results = await asyncio.gather(*calls)
        # The requests held by the killed replica were retried on `ok` before any byte was sent.
        assert [status for status, _ in results] == [200] * 4
        assert await router_count(mesh, "infermesh_router_retries_total{reason=connect}") >= 1

        # Now `ok` dies while streaming: the client gets an OpenAI error event, then [DONE].
        body = chat("tell me a long story", stream=True, max_tokens=2000)
        async with session.post(f"{mesh.router_url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            events: list[bytes] = []
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
                    if len(events) == 3:
                        kill(emulator(mesh, "ok"))
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_interrupted"
    assert "runtime failed while streaming" in error["message"]
    midstream = (
        f"infermesh_router_outcomes_total{{model={MODEL},outcome=midstream_failure,"
        "slo_class=standard}"
    )
    assert await router_count(mesh, midstream) == 1

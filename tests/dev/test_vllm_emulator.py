"""The vLLM emulator over real HTTP on 127.0.0.1, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import anyio
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from prometheus_client.parser import text_string_to_metric_families

from infermesh.dev.profiles import DEFAULT_MODEL, GpuProfile, get_profile
from infermesh.dev.vllm_emulator import EmulatorServer

pytestmark = pytest.mark.anyio

MODEL = DEFAULT_MODEL
StartEmulator = Callable[..., Awaitable[EmulatorServer]]


@pytest.fixture
async def server(start: StartEmulator) -> EmulatorServer:
    return await start(loras=("sql-lora",), replica_tag="r1")


def openai_client(base_url: str) -> openai.AsyncOpenAI:
    """A client for a loopback server; without TLS it skips loading CA certificates, which is
    slow enough to trip the blocked-loop detector."""
    return openai.AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx2.AsyncClient(verify=False),
    )


_warmed = False


async def warm_openai(base_url: str) -> None:
    """Make the first chat/completions calls of this process from a thread.

    The openai client builds its response models lazily on first use, which would otherwise
    run on (and block) the test's event loop.
    """
    global _warmed
    if _warmed:
        return

    def calls() -> None:
        with openai.OpenAI(
            base_url=f"{base_url}/v1", api_key="unused", http_client=httpx2.Client(verify=False)
        ) as sync_client:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
            sync_client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            for _ in sync_client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=1,
                stream=True,
                stream_options={"include_usage": True},
            ):
                pass
            sync_client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
            for _ in sync_client.completions.create(
                model=MODEL, prompt="Hi", max_tokens=1, stream=True
            ):
                pass
            list(sync_client.models.list())

    await anyio.to_thread.run_sync(calls)
    _warmed = True


@pytest.fixture
async def client(server: EmulatorServer) -> AsyncIterator[openai.AsyncOpenAI]:
    await warm_openai(server.url)
    async with openai_client(server.url) as client:
        yield client


async def raw_post(url: str, body: bytes | Mapping[str, object]) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=data, headers={"Content-Type": "application/json"}) as resp,
    ):
        return resp.status, await resp.read()


async def test_chat_completion_has_vllm_shape_and_usage(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=7
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-r1-")
    assert reply.model == MODEL
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert len((choice.message.content or "").split()) == 7
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 7
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 7


async def test_streamed_chat_ends_with_a_usage_chunk_when_asked(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length"
    assert all(reason is None for reason in reasons[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert {c.object for c in chunks} == {"chat.completion.chunk"}


async def test_stream_wire_format_is_data_lines_then_done(server: EmulatorServer) -> None:
    body = {"model": MODEL, "prompt": "Say something", "max_tokens": 3, "stream": True}
    status, raw = await raw_post(f"{server.url}/v1/completions", body)

    assert status == 200
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert [p["choices"][0]["finish_reason"] for p in payloads] == [None, None, "length"]
    assert all("usage" not in p for p in payloads)


async def test_completions_streamed_and_not(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert reply.object == "text_completion"
    assert reply.id.startswith("cmpl-")
    assert len(reply.choices[0].text.split()) == 4
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 4

    stream = await client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


async def test_without_max_tokens_the_answer_stops_on_its_own(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 64


async def test_unknown_model_is_404_in_openai_error_shape(
    client: openai.AsyncOpenAI, server: EmulatorServer
) -> None:
    with pytest.raises(openai.NotFoundError, match="The model `nope` does not exist"):
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "Hi"}]
        )
    status, raw = await raw_post(f"{server.url}/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404
    error = json.loads(raw)["error"]
    assert error["type"] == "NotFoundError"
    assert error["code"] == 404


async def test_stream_options_without_stream_is_refused(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="only be defined when `stream=True`"):
        await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            stream_options={"include_usage": True},
        )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"model": MODEL}).encode(), "'messages' is required"),
        (json.dumps({"model": MODEL, "messages": [{"content": "x"}]}).encode(), "'role'"),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}
            ).encode(),
            "max_tokens must be at least 1",
        ),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x" * 9000}]}
            ).encode(),
            "maximum context length is 2048 tokens",
        ),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}
            ).encode(),
            "'max_tokens' or 'max_completion_tokens' is too large: 5000",
        ),
        (
            json.dumps(
                {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}
            ).encode(),
            "n=2 is not supported",
        ),
    ],
)
async def test_bad_chat_requests_are_400_with_a_clear_message(
    server: EmulatorServer, body: bytes, message: str
) -> None:
    status, raw = await raw_post(f"{server.url}/v1/chat/completions", body)
    assert status == 400
    error = json.loads(raw)["error"]
    assert message in error["message"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400


async def test_models_lists_lora_adapters_with_their_parent(
    client: openai.AsyncOpenAI, server: EmulatorServer
) -> None:
    models = [model async for model in client.models.list()]
    assert [m.id for m in models] == [MODEL, "sql-lora"]
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/v1/models") as resp:
        cards = (await resp.json())["data"]
    assert cards[0]["parent"] is None
    assert cards[0]["max_model_len"] == 2048
    assert cards[1]["parent"] == MODEL
    assert cards[1]["owned_by"] == "vllm"

    reply = await client.chat.completions.create(
        model="sql-lora", messages=[{"role": "user", "content": "SELECT"}], max_tokens=2
    )
    assert reply.model == "sql-lora"


async def test_adapters_can_be_loaded_and_unloaded_at_runtime(server: EmulatorServer) -> None:
    load = {"lora_name": "new-lora", "lora_path": "/adapters/new"}
    status, raw = await raw_post(f"{server.url}/v1/load_lora_adapter", load)
    assert (status, raw.decode()) == (200, "Success: LoRA adapter 'new-lora' added successfully.")
    status, _ = await raw_post(f"{server.url}/v1/load_lora_adapter", load)
    assert status == 400
    status, _ = await raw_post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "new-lora"})
    assert status == 200
    status, _ = await raw_post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "new-lora"})
    assert status == 404


async def test_health_is_an_empty_200_and_request_ids_are_echoed(server: EmulatorServer) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.url}/health") as resp:
            assert resp.status == 200
            assert await resp.read() == b""
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        async with session.post(
            f"{server.url}/v1/completions", json=body, headers={"X-Request-Id": "abc-123"}
        ) as resp:
            assert resp.headers["X-Request-Id"] == "abc-123"


async def test_tokens_stream_as_the_engine_steps_produce_them(
    start: StartEmulator, slow_profile: GpuProfile
) -> None:
    server = await start(profile=slow_profile)  # 50 ms per step
    arrivals: list[float] = []
    await warm_openai(server.url)
    async with openai_client(server.url) as client:
        began = time.perf_counter()
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - began)

    assert len(arrivals) == 8
    # The engine sleeps one 50 ms step per token, so the last token cannot come before 8 steps
    # and the tokens cannot all arrive together.
    assert arrivals[-1] >= 8 * 0.05 * 0.95
    assert arrivals[-1] - arrivals[0] >= 7 * 0.05 * 0.9


async def test_a_client_that_goes_away_aborts_its_request(
    start: StartEmulator, slow_profile: GpuProfile
) -> None:
    server = await start(profile=slow_profile)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/v1/completions", json=body) as resp:
            await resp.content.readline()  # the first token has arrived
        deadline = time.monotonic() + 10
        while True:
            async with session.get(f"{server.url}/metrics") as metrics:
                page = await metrics.text()
            samples = {
                (s.name, s.labels.get("finished_reason", "")): s.value
                for family in text_string_to_metric_families(page)
                for s in family.samples
            }
            if samples[("vllm:request_success_total", "abort")] == 1:
                break
            assert time.monotonic() < deadline, "the aborted request was never counted"
            await asyncio.sleep(0.05)
    assert samples[("vllm:num_requests_running", "")] == 0
    assert samples[("vllm:kv_cache_usage_perc", "")] == 0


async def test_instant_profile_answers_both_apis_at_once(start: StartEmulator) -> None:
    server = await start(profile=get_profile("instant"))
    await warm_openai(server.url)
    async with openai_client(server.url) as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        stream = await client.completions.create(
            model=MODEL,
            prompt="Hi",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert [c.choices[0].finish_reason for c in chunks if c.choices] == [None, None, "length"]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


async def _chat(
    session: aiohttp.ClientSession, url: str, prompt: str, request_id: str, *, stream: bool
) -> tuple[str, dict[str, Any]]:
    """(response id, usage) of one chat request sent with `X-Request-Id: request_id`."""
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 2,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {"X-Request-Id": request_id}
    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        if not stream:
            answer = await resp.json()
            return str(answer["id"]), answer["usage"]
        text = await resp.text()
    chunks = [
        json.loads(line[len("data: ") :])
        for line in text.splitlines()
        if line.startswith("data: {")
    ]
    return str(chunks[0]["id"]), chunks[-1]["usage"]


LONG_PROMPT = "Answer from the policy handbook, section by section. " * 16


async def test_prefix_cache_hits_show_in_usage_with_prompt_tokens_details(
    start: StartEmulator,
) -> None:
    server = await start(enable_prompt_tokens_details=True)
    async with aiohttp.ClientSession() as session:
        _, first = await _chat(session, server.url, LONG_PROMPT, "a", stream=True)
        _, second = await _chat(session, server.url, LONG_PROMPT, "b", stream=True)
        _, third = await _chat(session, server.url, LONG_PROMPT + " Again?", "c", stream=False)
    # vLLM leaves the details out while nothing was cached, then reports the hit in blocks.
    assert first["prompt_tokens_details"] is None
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["prompt_tokens"]
    assert cached % 16 == 0
    assert third["prompt_tokens_details"]["cached_tokens"] >= cached


async def test_without_the_flag_usage_has_no_prompt_tokens_details(start: StartEmulator) -> None:
    server = await start()
    async with aiohttp.ClientSession() as session:
        for request_id in ("a", "b"):
            _, usage = await _chat(session, server.url, LONG_PROMPT, request_id, stream=True)
            assert usage["prompt_tokens_details"] is None


async def test_dev_requests_says_where_each_requests_first_token_time_went(
    start: StartEmulator,
) -> None:
    server = await start()
    async with aiohttp.ClientSession() as session:
        first_id, _ = await _chat(session, server.url, LONG_PROMPT, "trace-1", stream=True)
        second_id, _ = await _chat(session, server.url, LONG_PROMPT, "trace-2", stream=False)
        async with session.get(f"{server.url}/dev/requests") as resp:
            entries = (await resp.json())["requests"]
    assert [(e["x_request_id"], e["response_id"]) for e in entries] == [
        ("trace-1", first_id),
        ("trace-2", second_id),
    ]
    cold, warm = entries
    assert cold["cached_tokens"] == 0
    assert warm["cached_tokens"] > 0
    for entry in entries:
        assert entry["prompt_tokens"] == warm["prompt_tokens"]
        assert entry["output_tokens"] == 2
        assert entry["finish_reason"] == "length"
        assert entry["waiting_at_arrival"] == entry["running_at_arrival"] == 0
        assert entry["queue_s"] >= 0
        assert entry["prefill_s"] > 0
        assert entry["ttft_s"] == pytest.approx(entry["queue_s"] + entry["prefill_s"], abs=1e-5)
        assert entry["e2e_s"] >= entry["ttft_s"]

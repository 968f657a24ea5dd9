"""The router speaks the OpenAI API to the real `openai` client, streamed and not, with usage."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from infermesh.dev.harness import LocalMesh

from .conftest import MODEL

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def client(mesh: LocalMesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.router_url}/v1", api_key="unused", max_retries=0)


async def test_chat_completion_returns_text_and_usage(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        reply = await oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8
        )
    assert reply.model == MODEL
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens > 0


async def test_streamed_chat_delivers_chunks_then_usage(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        stream = await oai.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Count to ten"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


async def test_completion_and_streamed_completion(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        reply = await oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
        assert reply.choices[0].text
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 5
        stream = await oai.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6


async def test_models_lists_what_the_agent_knows(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        models = [m.id async for m in oai.models.list()]
    assert models == [MODEL]


async def test_unknown_model_is_404_with_openai_error(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        with pytest.raises(openai.NotFoundError) as info:
            await oai.chat.completions.create(
                model="no-such-model", messages=[{"role": "user", "content": "hi"}]
            )
    assert "no-such-model" in str(info.value)


async def test_missing_messages_is_400(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        with pytest.raises(openai.BadRequestError) as info:
            await oai.chat.completions.create(model=MODEL, messages=None)  # type: ignore[call-overload]
    assert "messages" in str(info.value)


async def test_malformed_json_is_400(mesh: LocalMesh) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{mesh.router_url}/v1/chat/completions",
            data=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        ) as resp,
    ):
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "JSON" in body["error"]["message"]


async def test_invalid_slo_header_is_400(mesh: LocalMesh) -> None:
    async with client(mesh) as oai:
        with pytest.raises(openai.BadRequestError) as info:
            await oai.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-infermesh-slo": "urgent"},
            )
    assert "urgent" in str(info.value)


async def test_body_over_limit_is_413(mesh: LocalMesh) -> None:
    huge = "x" * (9 * 1024 * 1024)  # over the default 8 MiB limit
    async with client(mesh) as oai:
        with pytest.raises(openai.APIStatusError) as info:
            await oai.completions.create(model=MODEL, prompt=huge, max_tokens=1)
    assert info.value.status_code == 413

"""The vLLM emulator's `POST /v1/embeddings`: deterministic unit vectors, float or base64."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from infermesh.dev import openai_protocol as proto
from infermesh.dev.profiles import DEFAULT_MODEL
from infermesh.dev.vllm_emulator import EmulatorServer

pytestmark = pytest.mark.anyio

StartEmulator = Callable[..., Awaitable[EmulatorServer]]


def _request(**fields: object) -> proto.EmbeddingRequest:
    body = json.dumps({"model": DEFAULT_MODEL, **fields}).encode()
    return proto.parse_embedding_request(body, [DEFAULT_MODEL])


def test_vectors_are_deterministic_unit_vectors() -> None:
    first = proto.embedding_vector("a cat", 16)
    assert first == proto.embedding_vector("a cat", 16)
    assert first != proto.embedding_vector("a dog", 16)
    assert math.fsum(v * v for v in first) == pytest.approx(1.0)
    assert len(proto.embedding_vector("x", 200)) == 200


def test_inputs_tokens_and_base64_encoding() -> None:
    request = _request(input=["abcd", "efgh"], encoding_format="base64", dimensions=4)
    assert request.inputs == ("abcd", "efgh")
    assert request.prompt_tokens == 2
    body = proto.embedding_response(request, "embd-1", 0)
    assert body["object"] == "list"
    assert [item["index"] for item in body["data"]] == [0, 1]
    decoded = struct.unpack("<4f", base64.b64decode(body["data"][0]["embedding"]))
    assert decoded == pytest.approx(proto.embedding_vector("abcd", 4), abs=1e-6)
    assert body["usage"]["prompt_tokens"] == 2
    assert _request(input=[1, 2, 3]).prompt_tokens == 3


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"input": []}, 400),
        ({"input": None}, 400),
        ({"input": "a", "encoding_format": "hex"}, 400),
        ({"input": "a", "dimensions": 0}, 400),
        ({"input": "a", "model": "other"}, 404),
    ],
)
def test_bad_requests(fields: dict[str, object], status: int) -> None:
    with pytest.raises(proto.ApiError) as refused:
        _request(**fields)
    assert refused.value.status == status


async def test_served_embeddings(start: StartEmulator) -> None:
    server = await start()
    body = {"model": DEFAULT_MODEL, "input": "a cat", "dimensions": 8}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.url}/v1/embeddings", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["X-Request-Id"].startswith("embd-")
        answer = await response.json()
    assert answer["data"][0]["embedding"] == pytest.approx(proto.embedding_vector("a cat", 8))

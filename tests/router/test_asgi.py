"""ASGI plumbing: body limits enforced while reading, and which headers are forwarded."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from infermesh.router.agent_client import AgentClient
from infermesh.router.agent_scoring import AgentScoring
from infermesh.router.app import RouterApp, RouterSettings
from infermesh.router.asgi import Message, split_request_headers
from infermesh.router.errors import ApiError


class EndlessUpload:
    """An ASGI `receive` that delivers 100-byte body chunks forever, counting them."""

    def __init__(self) -> None:
        self.pulled = 0

    async def __call__(self) -> Message:
        self.pulled += 1
        return {"type": "http.request", "body": b"x" * 100, "more_body": True}


class Responses:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)


def http_scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}


@pytest.mark.anyio
async def test_a_chunked_body_is_refused_without_reading_past_the_limit() -> None:
    app = RouterApp(
        AgentScoring(AgentClient("unix:///nonexistent.sock")),
        {},
        RouterSettings(max_body_bytes=1000),
    )
    upload, responses = EndlessUpload(), Responses()
    await app(http_scope("/v1/chat/completions", []), upload, responses)
    assert responses.messages[0]["status"] == 413
    assert upload.pulled == 11  # 1,100 bytes: the first message over the limit
    error = orjson.loads(responses.messages[1]["body"])["error"]
    assert error["code"] == "request_too_large"


@pytest.mark.anyio
async def test_a_declared_content_length_over_the_limit_is_refused_before_reading() -> None:
    app = RouterApp(
        AgentScoring(AgentClient("unix:///nonexistent.sock")),
        {},
        RouterSettings(max_body_bytes=1000),
    )
    upload, responses = EndlessUpload(), Responses()
    scope = http_scope("/v1/completions", [(b"content-length", b"1001")])
    await app(scope, upload, responses)
    assert responses.messages[0]["status"] == 413
    assert upload.pulled == 0


def test_hop_by_hop_headers_are_not_forwarded_and_routing_headers_are_read() -> None:
    headers = split_request_headers(
        [
            (b"host", b"router:8080"),
            (b"connection", b"keep-alive"),
            (b"content-length", b"12"),
            (b"transfer-encoding", b"chunked"),
            (b"authorization", b"Bearer k"),
            (b"traceparent", b"00-abc-def-01"),
            (b"x-request-id", b"r1"),
            (b"x-infermesh-slo", b"batch"),
            (b"x-infermesh-tenant", b"acme"),
        ]
    )
    # traceparent is read, not forwarded as is: the router sends its own hop's.
    assert [name for name, _ in headers.forward] == [
        "authorization",
        "x-request-id",
        "x-infermesh-slo",
        "x-infermesh-tenant",
    ]
    assert (headers.content_length, headers.request_id) == (12, "r1")
    assert (headers.slo, headers.tenant) == ("batch", "acme")
    assert headers.traceparent == "00-abc-def-01"


def test_the_routers_own_api_key_is_not_forwarded_when_it_checks_keys() -> None:
    raw = [(b"authorization", b"Bearer k"), (b"content-type", b"application/json")]
    headers = split_request_headers(raw, drop_authorization=True)
    assert [name for name, _ in headers.forward] == ["content-type"]
    assert headers.content_type == b"application/json"


def test_a_malformed_content_length_is_a_400() -> None:
    with pytest.raises(ApiError) as caught:
        split_request_headers([(b"content-length", b"-5")])
    assert caught.value.status == 400

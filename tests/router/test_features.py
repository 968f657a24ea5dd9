"""Feature extraction: what the router reads from a request's body and headers, and refuses."""

from __future__ import annotations

import orjson
import pytest

from infermesh.core.model import SloClass
from infermesh.router.errors import ApiError
from infermesh.router.features import (
    PREFIX_CHARS,
    Route,
    estimate_tokens,
    parse_request,
    prefix_key_of,
    text_prefix_keys,
    token_prefix_keys,
)

SYSTEM = "You are a meticulous assistant for the ACME support desk. " * 8  # > 256 characters


def chat(**fields: object) -> bytes:
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return orjson.dumps(body)


def bad(route: Route, body: bytes, slo: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        parse_request(route, body, slo_header=slo)
    assert caught.value.status == 400
    return caught.value


def test_reads_model_stream_max_tokens_and_usage_option() -> None:
    body = chat(stream=True, stream_options={"include_usage": True}, max_completion_tokens=77)
    parsed = parse_request(Route.CHAT, body, request_id="req-1")
    features = parsed.features
    assert (features.model, features.stream, features.max_output_tokens) == ("m", True, 77)
    assert parsed.include_usage
    assert features.request_id == "req-1"


def test_max_tokens_is_used_when_max_completion_tokens_is_absent() -> None:
    assert parse_request(Route.CHAT, chat(max_tokens=12)).features.max_output_tokens == 12
    assert parse_request(Route.CHAT, chat()).features.max_output_tokens == 0


def test_include_usage_only_counts_for_streamed_requests() -> None:
    parsed = parse_request(Route.CHAT, chat(stream_options={"include_usage": True}))
    assert not parsed.include_usage


def test_prompt_tokens_are_estimated_at_four_characters_per_token() -> None:
    assert estimate_tokens(0) == 0
    assert estimate_tokens(1) == 1
    assert estimate_tokens(400) == 100
    messages = [
        {"role": "system", "content": "a" * 40},
        {"role": "user", "content": [{"type": "text", "text": "b" * 40}, {"type": "image_url"}]},
    ]
    features = parse_request(Route.CHAT, chat(messages=messages)).features
    assert features.prompt_tokens == 20


def test_completion_prompts_of_every_openai_shape_are_counted() -> None:
    def tokens(prompt: object) -> int:
        body = orjson.dumps({"model": "m", "prompt": prompt})
        return parse_request(Route.COMPLETIONS, body).features.prompt_tokens

    assert tokens("x" * 80) == 20
    assert tokens(["x" * 40, "y" * 40]) == 20
    assert tokens([1, 2, 3]) == 3
    assert tokens([[1, 2], [3, 4, 5]]) == 5


def test_prefix_key_is_stable_across_calls_and_independent_of_later_turns() -> None:
    first = chat(messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a"}])
    second = chat(
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "something else entirely"},
            {"role": "assistant", "content": "ok"},
        ]
    )
    key = parse_request(Route.CHAT, first).features.prefix_key
    assert key != 0
    assert key == parse_request(Route.CHAT, first).features.prefix_key
    assert key == parse_request(Route.CHAT, second).features.prefix_key


def test_prefix_key_has_a_fixed_value_for_a_fixed_prefix() -> None:
    # The key is part of the agent's affinity map: it must not change between versions or runs.
    assert prefix_key_of(b"user:hello\n") == 0x34F97542950EA05C
    assert prefix_key_of(b"") == 0


def test_short_shared_system_prompts_include_the_first_user_turn() -> None:
    def key(question: str) -> int:
        messages = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": question},
        ]
        return parse_request(Route.CHAT, chat(messages=messages)).features.prefix_key

    assert key("What is 2+2?") != key("Name a colour.")


def test_prefix_key_only_reads_the_first_prefix_characters() -> None:
    base = "p" * PREFIX_CHARS

    def key(prompt: str) -> int:
        body = orjson.dumps({"model": "m", "prompt": prompt})
        return parse_request(Route.COMPLETIONS, body).features.prefix_key

    assert key(base + "tail one") == key(base + "tail two")
    assert key("q" + base) != key(base)


def test_a_conversations_next_turn_repeats_the_prefix_keys_of_its_earlier_turns() -> None:
    history = [
        {"role": "system", "content": SYSTEM * 3},  # ~1,400 characters
        {"role": "user", "content": "u" * 700},
        {"role": "assistant", "content": "a" * 2000},
    ]
    turn1 = parse_request(Route.CHAT, chat(messages=history[:2])).features
    turn2 = parse_request(
        Route.CHAT, chat(messages=[*history, {"role": "user", "content": "more"}])
    ).features
    other = parse_request(
        Route.CHAT, chat(messages=[history[0], {"role": "user", "content": "v" * 700}])
    ).features
    # ~2,150 characters: the 256, 512, 1024 and 2048-character depths (64 to 512 tokens)
    assert len(turn1.prefix_keys) == 4
    assert turn2.prefix_keys[:4] == turn1.prefix_keys
    assert len(turn2.prefix_keys) == 5  # ~4,130 characters: also the 4096-character depth
    # another conversation of the tenant shares only what lies inside the system prompt
    assert other.prefix_keys[:3] == turn1.prefix_keys[:3]
    assert other.prefix_keys[3] != turn1.prefix_keys[3]
    assert turn1.prefix_key == turn1.prefix_keys[0]


def test_prefix_keys_are_at_fixed_depths_of_text_and_token_ids() -> None:
    ids = list(range(5000))
    keys = token_prefix_keys(ids)
    assert len(keys) == 7  # 64 ... 4096 ids
    assert keys[0] == prefix_key_of(b"ids:" + ",".join(map(str, ids[:64])).encode())
    assert keys[3] == prefix_key_of(b"ids:" + ",".join(map(str, ids[:512])).encode())
    assert token_prefix_keys(ids[:300]) == keys[:3]
    assert token_prefix_keys(ids[:10]) == (prefix_key_of(b"ids:0,1,2,3,4,5,6,7,8,9"),)
    assert token_prefix_keys([]) == ()
    text = "t" * 5000
    assert text_prefix_keys(text)[0] == prefix_key_of(b"t" * PREFIX_CHARS)
    assert text_prefix_keys(text)[4] == prefix_key_of(b"t" * 4096)
    assert len(text_prefix_keys(text)) == 5
    assert text_prefix_keys("") == ()
    body = orjson.dumps({"model": "m", "prompt": ids})
    assert parse_request(Route.COMPLETIONS, body).features.prefix_keys == keys
    embeddings = orjson.dumps({"model": "m", "input": "x" * 600})
    assert parse_request(Route.EMBEDDINGS, embeddings).features.prefix_keys == ()


def test_slo_class_and_tenant_come_from_headers() -> None:
    features = parse_request(
        Route.CHAT, chat(), slo_header="Latency", tenant_header=" acme "
    ).features
    assert features.slo_class is SloClass.LATENCY
    assert features.tenant == "acme"
    assert parse_request(Route.CHAT, chat()).features.slo_class is SloClass.STANDARD


def test_unknown_slo_class_is_a_400_naming_the_header_and_the_choices() -> None:
    error = bad(Route.CHAT, chat(), slo="gold")
    assert "x-infermesh-slo" in error.message
    assert "latency" in error.message
    assert error.code == "invalid_header"


@pytest.mark.parametrize(
    ("route", "body", "param", "fragment"),
    [
        (Route.CHAT, b"", None, "empty"),
        (Route.CHAT, b"{not json", None, "not valid JSON"),
        (Route.CHAT, b"[1, 2]", None, "JSON object"),
        (Route.CHAT, orjson.dumps({"messages": []}), "model", "'model' is required"),
        (Route.CHAT, chat(model=7), "model", "non-empty string"),
        (Route.CHAT, chat(messages="hello"), "messages", "list of message objects"),
        (Route.CHAT, chat(messages=[]), "messages", "at least one"),
        (Route.CHAT, chat(messages=["hi"]), "messages[0]", "must be an object"),
        (Route.CHAT, chat(messages=[{"content": "x"}]), "messages[0].role", "role"),
        (
            Route.CHAT,
            chat(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            "string",
        ),
        (Route.CHAT, chat(stream="yes"), "stream", "boolean"),
        (Route.CHAT, chat(stream_options=[]), "stream_options", "object"),
        (Route.CHAT, chat(max_tokens="10"), "max_tokens", "integer"),
        (Route.CHAT, chat(max_completion_tokens=-1), "max_completion_tokens", "integer"),
        (Route.COMPLETIONS, orjson.dumps({"model": "m"}), "prompt", "'prompt' is required"),
        (Route.COMPLETIONS, orjson.dumps({"model": "m", "prompt": 3}), "prompt", "int"),
        (Route.COMPLETIONS, orjson.dumps({"model": "m", "prompt": []}), "prompt", "empty list"),
        (
            Route.COMPLETIONS,
            orjson.dumps({"model": "m", "prompt": [1, "a"]}),
            "prompt",
            "token ids",
        ),
    ],
)
def test_malformed_or_wrong_typed_input_is_a_400_naming_the_field(
    route: Route, body: bytes, param: str | None, fragment: str
) -> None:
    error = bad(route, body)
    assert error.param == param
    assert fragment in error.message
    assert error.error_type == "invalid_request_error"

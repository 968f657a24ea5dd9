"""Read what routing needs from an OpenAI request: model, stream flag, token estimates, prefix key.

The body is parsed once with orjson and never re-serialised: the router forwards the original
bytes. Pure functions only; nothing here does I/O or reads a clock.

Prefix key: a stable 64-bit blake2b hash of the first `PREFIX_CHARS` (256) characters of the
leading prompt blocks — for chat, every message up to and including the first `user` message
(so the system prompt and the first question), each written as `role:text\\n`; for completions,
the first prompt (or its first 64 token ids). 256 characters are about 64 tokens, i.e. four
16-token KV-cache blocks in vLLM: requests that share a system prompt of at least that length
share a key however their later turns differ, which is what lets prefix affinity send them to the
replica that already holds those blocks. Shorter shared prefixes include the start of the user
turn and so spread over replicas, which is right because there is little cache to reuse.

Prefix keys (`RequestFeatures.prefix_keys`): the same hash at several depths
(infermesh.core.scoring.prefix.PREFIX_DEPTHS: the first 64, 128, 256, ... tokens, taken as 4
characters a token for text) over the whole prompt — for chat, every message written as
`role:text\\n` in order, so a conversation's next turn shares the keys of its earlier turns; for
completions, the first prompt (its text or token ids). A prompt gets the keys of the depths it
reaches, and at least one (over the whole prompt when it is shorter than 64 tokens). The
prefix scorer favours the replica that recently got the deepest of them.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson

from infermesh.core.model import RequestFeatures, SloClass
from infermesh.core.scoring.prefix import PREFIX_DEPTHS
from infermesh.router.errors import bad_request

__all__ = [
    "PREFIX_CHARS",
    "ParsedRequest",
    "Route",
    "estimate_tokens",
    "parse_request",
    "prefix_key_of",
    "text_prefix_keys",
    "token_prefix_keys",
]

PREFIX_CHARS = 256
"""Characters of the leading prompt blocks hashed into the prefix key."""
PREFIX_TOKEN_IDS = 64
"""Token ids of a pre-tokenised prompt hashed into the prefix key."""
CHARS_PER_TOKEN = 4
SLO_HEADER = "x-infermesh-slo"
TENANT_HEADER = "x-infermesh-tenant"


class Route(enum.Enum):
    """The inference endpoints the router forwards; the value is the upstream path."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"

    @property
    def label(self) -> str:
        """Short name used in metric labels."""
        return _LABELS[self]


_LABELS = {Route.CHAT: "chat", Route.COMPLETIONS: "completions", Route.EMBEDDINGS: "embeddings"}


@attrs.frozen
class ParsedRequest:
    """A validated request: its routing features and the stream options the relay needs."""

    features: RequestFeatures
    include_usage: bool = False


def estimate_tokens(chars: int) -> int:
    """Prompt tokens from characters: ~4 characters per token for English BPE vocabularies."""
    return -(-chars // CHARS_PER_TOKEN)


def prefix_key_of(data: bytes) -> int:
    """A stable, non-zero 64-bit key for prefix bytes; 0 (no prefix) for empty input."""
    if not data:
        return 0
    key = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
    return key or 1


def _digest_key(digest: bytes) -> int:
    return int.from_bytes(digest, "big") or 1


def text_prefix_keys(text: str) -> tuple[int, ...]:
    """Keys of `text`'s first 4 x `PREFIX_DEPTHS` characters (those it reaches; at least the
    first, over all of a shorter text); empty for empty text. The first key is
    `prefix_key_of` of the first 256 characters."""
    if not text:
        return ()
    hasher = hashlib.blake2b(digest_size=8)
    done = 0
    keys: list[int] = []
    for depth in PREFIX_DEPTHS:
        end = depth * CHARS_PER_TOKEN
        if keys and len(text) < end:
            break
        hasher.update(text[done:end].encode("utf-8", "surrogatepass"))
        done = end
        keys.append(_digest_key(hasher.digest()))
    return tuple(keys)


def token_prefix_keys(token_ids: Sequence[int]) -> tuple[int, ...]:
    """Keys of the first `PREFIX_DEPTHS` token ids (those the prompt reaches; at least the
    first, over all of a shorter prompt); empty for no ids. The first key is the prefix key of
    the first 64 ids."""
    if not token_ids:
        return ()
    hasher = hashlib.blake2b(b"ids:", digest_size=8)
    done = 0
    keys: list[int] = []
    for depth in PREFIX_DEPTHS:
        if keys and len(token_ids) < depth:
            break
        chunk = ",".join([str(t) for t in token_ids[done:depth]])
        hasher.update((chunk if not done else "," + chunk).encode())
        done = depth
        keys.append(_digest_key(hasher.digest()))
    return tuple(keys)


def _text_prefix_key(text: str) -> int:
    return prefix_key_of(text[:PREFIX_CHARS].encode("utf-8", "surrogatepass"))


def _token_ids_key(token_ids: list[Any]) -> int:
    head = token_ids[:PREFIX_TOKEN_IDS]
    return prefix_key_of(b"ids:" + ",".join(str(t) for t in head).encode())


def _content_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or the `text` of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise bad_request(
        f"'{where}.content' must be a string or a list of content parts, "
        f"not {type(content).__name__}",
        param=f"{where}.content",
    )


def _chat_prompt(body: Mapping[str, Any]) -> tuple[int, int, tuple[int, ...]]:
    """(prompt characters, prefix key, prefix keys) of a chat request's `messages`."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise bad_request(
            "'messages' is required and must be a list of message objects"
            + ("" if messages is None else f", not {type(messages).__name__}"),
            param="messages",
        )
    if not messages:
        raise bad_request("'messages' must contain at least one message", param="messages")
    chars = 0
    prefix_parts: list[str] = []
    prefix_len = 0
    prefix_done = False
    conversation: list[str] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad_request(f"'{where}' must be an object with 'role' and 'content'", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(
                f"'{where}.role' is required and must be a string", param=f"{where}.role"
            )
        text = _content_text(message.get("content"), where)
        chars += len(text)
        conversation.append(f"{role}:{text}\n")
        if not prefix_done:
            if prefix_len < PREFIX_CHARS:
                block = f"{role}:{text}\n"
                prefix_parts.append(block)
                prefix_len += len(block)
            prefix_done = role == "user" or prefix_len >= PREFIX_CHARS
    keys = text_prefix_keys("".join(conversation))
    return chars, _text_prefix_key("".join(prefix_parts)), keys


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _completion_prompt(body: Mapping[str, Any]) -> tuple[int, int, tuple[int, ...]]:
    """(prompt tokens, prefix key, prefix keys) of a completions request's `prompt`.

    `prompt` may be a string, a list of strings, a list of token ids, or a list of such lists.
    """
    prompt = body.get("prompt")
    expected = "a string, a list of strings, or a list of token ids"
    if isinstance(prompt, str):
        keys = text_prefix_keys(prompt)
        return estimate_tokens(len(prompt)), _text_prefix_key(prompt), keys
    if not isinstance(prompt, list) or not prompt:
        got = "missing" if prompt is None else f"a {type(prompt).__name__}"
        if isinstance(prompt, list):
            got = "an empty list"
        raise bad_request(f"'prompt' is required and must be {expected}; got {got}", param="prompt")
    if _is_token_ids(prompt):
        return len(prompt), _token_ids_key(prompt), token_prefix_keys(prompt)
    if all(isinstance(p, str) for p in prompt):
        chars = sum(len(p) for p in prompt)
        return estimate_tokens(chars), _text_prefix_key(prompt[0]), text_prefix_keys(prompt[0])
    if all(_is_token_ids(p) for p in prompt):
        tokens = sum(len(p) for p in prompt)
        return tokens, _token_ids_key(prompt[0]), token_prefix_keys(prompt[0])
    raise bad_request(f"'prompt' must be {expected}", param="prompt")


def _embedding_input(body: Mapping[str, Any]) -> int:
    """Prompt tokens of an embeddings request's `input` (same shapes as a completions prompt)."""
    value = body.get("input")
    expected = "a string, a list of strings, or a list of token ids (or of such lists)"
    if isinstance(value, str):
        return estimate_tokens(len(value))
    if isinstance(value, list) and value:
        if _is_token_ids(value):
            return len(value)
        if all(isinstance(v, str) for v in value):
            return estimate_tokens(sum(len(v) for v in value))
        if all(_is_token_ids(v) for v in value):
            return sum(len(v) for v in value)
    got = "missing" if value is None else f"{_show_type(value)}"
    raise bad_request(f"'input' is required and must be {expected}; got {got}", param="input")


def _show_type(value: Any) -> str:
    if isinstance(value, list):
        return "an empty list" if not value else "a list of mixed or non-text items"
    return f"a {type(value).__name__}"


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise bad_request(f"'{name}' must be a non-negative integer, not {value!r}", param=name)
    return value


def _bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean, not {value!r}", param=name)
    return value


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    return _bool_field(options, "include_usage")


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`, or a 400 saying what is wrong with it."""
    if not body:
        raise bad_request("request body is empty; expected a JSON object")
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"request body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise bad_request(f"request body must be a JSON object, not {type(parsed).__name__}")
    return parsed


def parse_request(
    route: Route,
    body: bytes,
    slo_header: str | None = None,
    tenant_header: str | None = None,
    request_id: str = "",
) -> ParsedRequest:
    """Validate the fields routing reads and derive the request's features.

    Raises `ApiError` (400) for malformed JSON, a missing or wrong-typed `model`, `messages`
    (chat), `prompt` (completions) or `input` (embeddings), wrong-typed `stream`,
    `stream_options`, `max_tokens` / `max_completion_tokens`, a streamed embeddings request, or
    an unknown `x-infermesh-slo` value. Everything else in the body
    is the runtime's business.
    """
    try:
        slo_class = SloClass.parse(slo_header)
    except ValueError as exc:
        raise bad_request(f"invalid {SLO_HEADER} header: {exc}", code="invalid_header") from None
    parsed = parse_body(body)
    model = parsed.get("model")
    if not isinstance(model, str) or not model:
        got = "missing" if model is None else repr(model)
        raise bad_request(
            f"'model' is required and must be a non-empty string; got {got}", param="model"
        )
    stream = _bool_field(parsed, "stream")
    include_usage = _include_usage(parsed)
    if route is Route.CHAT:
        chars, prefix_key, prefix_keys = _chat_prompt(parsed)
        prompt_tokens = estimate_tokens(chars)
        max_tokens = _optional_int(parsed, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _optional_int(parsed, "max_tokens")
    elif route is Route.COMPLETIONS:
        prompt_tokens, prefix_key, prefix_keys = _completion_prompt(parsed)
        max_tokens = _optional_int(parsed, "max_tokens")
    else:
        if stream:
            raise bad_request("embeddings cannot be streamed; drop 'stream'", param="stream")
        prompt_tokens, prefix_key, max_tokens = _embedding_input(parsed), 0, 0
        prefix_keys = ()
    features = RequestFeatures(
        model=model,
        slo_class=slo_class,
        prompt_tokens=prompt_tokens,
        max_output_tokens=max_tokens or 0,
        prefix_key=prefix_key,
        prefix_keys=prefix_keys,
        tenant=(tenant_header or "").strip(),
        stream=stream,
        request_id=request_id,
    )
    return ParsedRequest(features=features, include_usage=stream and include_usage)

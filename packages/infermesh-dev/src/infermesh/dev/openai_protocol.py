"""vLLM's OpenAI-compatible wire shapes: request validation, responses, stream chunks, errors.

Pure functions from parsed JSON to dicts and bytes; the HTTP shell in `vllm_emulator` moves them.
Error messages follow vLLM's where it has one. Never does I/O or reads a clock (callers pass
`created`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs

from infermesh.dev.tokens import chat_prompt_text, count_tokens, tokenize

__all__ = [
    "ApiError",
    "EmbeddingRequest",
    "GenerationRequest",
    "chat_chunk",
    "chat_response",
    "completion_chunk",
    "completion_response",
    "embedding_response",
    "embedding_vector",
    "error_body",
    "model_list",
    "parse_embedding_request",
    "parse_generation_request",
    "sse",
    "usage",
    "usage_chunk",
]

Kind = Literal["chat", "completion"]
SSE_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, *, error_type: str = "", param: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or {404: "NotFoundError", 400: "BadRequestError"}.get(
            status, "InternalServerError"
        )
        self.param = param


def error_body(error: ApiError) -> bytes:
    """vLLM's ErrorResponse JSON: `{"error": {"message", "type", "param", "code"}}`."""
    return json.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": error.param,
                "code": error.status,
            }
        }
    ).encode()


@attrs.frozen
class GenerationRequest:
    """A validated chat or completion request, reduced to what the emulator acts on.

    `prompt` is the prompt text (chat messages rendered through a template) or the token ids a
    completion request sent; tokenizing is left to whoever needs the ids.
    """

    kind: Kind
    model: str
    prompt: str | tuple[int, ...]
    prompt_tokens: int
    max_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    continuous_usage: bool

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return tuple(tokenize(self.prompt)) if isinstance(self.prompt, str) else self.prompt


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _optional_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer, got {value!r}", name)
    return value


def _prompt(kind: Kind, body: Mapping[str, Any]) -> str | tuple[int, ...]:
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' is required and must be a non-empty list", "messages")
        try:
            return chat_prompt_text(messages)
        except ValueError as exc:
            raise _bad(str(exc), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt")
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise _bad("batched prompts are not supported by the emulator; send one prompt", "prompt")
    raise _bad("'prompt' is required: a string or a list of token ids", "prompt")


def parse_generation_request(
    kind: Kind,
    raw_body: bytes,
    *,
    served_models: Sequence[str],
    max_model_len: int,
    default_max_tokens: int,
) -> GenerationRequest:
    """Validate a request body as vLLM would; raises ApiError (400/404) with vLLM's wording."""
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    model = body.get("model")
    if model is None:
        model = served_models[0]
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {model!r}", "model")
    if model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad(f"'stream' must be a boolean, got {stream!r}", "stream")
    stream = bool(stream)
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    n = _optional_int(body, "n")
    if n is not None and n != 1:
        raise _bad(f"n={n} is not supported by the emulator; use n=1", "n")
    prompt = _prompt(kind, body)
    input_len = count_tokens(prompt) if isinstance(prompt, str) else len(prompt)
    if input_len >= max_model_len:
        raise _bad(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {input_len} input tokens. Please reduce the length of the input.",
        )
    max_tokens = _optional_int(body, "max_completion_tokens") if kind == "chat" else None
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise _bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    if max_tokens is not None and input_len + max_tokens > max_model_len:
        raise _bad(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has {input_len} "
            f"input tokens ({max_tokens} > {max_model_len} - {input_len}).",
            "max_tokens",
        )
    if max_tokens is None:
        # Without a limit the emulated model "stops" on its own after a short answer.
        length, reason = min(default_max_tokens, max_model_len - input_len), "stop"
    else:
        length, reason = max_tokens, "length"
    options = stream_options or {}
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt=prompt,
        prompt_tokens=input_len,
        max_tokens=length,
        finish_reason=reason,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        continuous_usage=bool(options.get("continuous_usage_stats", False)),
    )


# ---------------------------------------------------------------------- responses


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> dict[str, Any]:
    """vLLM's `usage`. `cached_tokens` (prompt tokens served from the prefix cache) is reported
    as `prompt_tokens_details.cached_tokens` only when given and above 0, as vLLM does under
    `--enable-prompt-tokens-details` (its default leaves `prompt_tokens_details` null)."""
    details = {"cached_tokens": cached_tokens} if cached_tokens else None
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
    }


def chat_response(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "tool_calls": [],
                    "reasoning_content": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        "prompt_logprobs": None,
        "kv_transfer_params": None,
    }


def completion_response(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
                "prompt_logprobs": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
        "kv_transfer_params": None,
    }


def chat_chunk(
    request_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any],
    finish_reason: str | None = None,
    chunk_usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": dict(delta),
                "logprobs": None,
                "finish_reason": finish_reason,
                **({"stop_reason": None} if finish_reason else {}),
            }
        ],
    }
    if chunk_usage is not None:
        chunk["usage"] = dict(chunk_usage)
    return chunk


def completion_chunk(
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    chunk_usage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
    }
    if chunk_usage is not None:
        chunk["usage"] = dict(chunk_usage)
    return chunk


def usage_chunk(
    kind: Kind,
    request_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    """The final `include_usage` chunk: no choices, just usage."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event as vLLM writes it: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def model_list(
    base_model: str, adapters: Mapping[str, str], created: int, max_model_len: int
) -> dict[str, Any]:
    """GET /v1/models: the base model card, then one card per LoRA adapter (name -> path).

    As vLLM lists LoRA modules: `root` is the adapter's path, `parent` the base model.
    """

    def permission(suffix: str) -> dict[str, Any]:
        return {
            "id": f"modelperm-{suffix}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }

    cards: list[dict[str, Any]] = [
        {
            "id": base_model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": base_model,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [permission("0")],
        }
    ]
    for position, (adapter, path) in enumerate(adapters.items(), start=1):
        cards.append(
            {
                "id": adapter,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": path,
                "parent": base_model,
                "max_model_len": None,
                "permission": [permission(str(position))],
            }
        )
    return {"object": "list", "data": cards}


# ---------------------------------------------------------------------------- embeddings

EMBEDDING_DIMENSIONS = 64
"""Length of the emulator's embedding vectors unless the request asks for `dimensions`."""


@attrs.frozen
class EmbeddingRequest:
    """A validated `POST /v1/embeddings` body."""

    model: str
    inputs: tuple[str, ...]
    """Each input as text (token-id inputs are written as their ids joined by spaces)."""
    prompt_tokens: int
    dimensions: int
    base64: bool


def parse_embedding_request(body: bytes, served_models: Sequence[str]) -> EmbeddingRequest:
    """Validate an embeddings request as vLLM does: `model`, `input`, `encoding_format`,
    `dimensions`; raises `ApiError` (400, or 404 for an unknown model)."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or model not in served_models:
        raise ApiError(404, f"The model `{model}` does not exist.")
    raw = data.get("input")
    texts: list[str] = []
    tokens = 0
    items: list[Any] = raw if isinstance(raw, list) and raw and not _is_ids(raw) else [raw]
    for item in items:
        if isinstance(item, str):
            texts.append(item)
            tokens += count_tokens(item)
        elif _is_ids(item):
            texts.append(" ".join(str(t) for t in item))
            tokens += len(item)
        else:
            raise ApiError(
                400,
                "'input' must be a string, a list of strings, or token ids",
                param="input",
            )
    encoding = data.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(
            400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    dimensions = data.get("dimensions", EMBEDDING_DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
        raise ApiError(400, "'dimensions' must be a positive integer", param="dimensions")
    return EmbeddingRequest(model, tuple(texts), tokens, dimensions, encoding == "base64")


def _is_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`: the same text always embeds the same."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.blake2b(f"{counter}:{text}".encode(), digest_size=64).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embedding_response(request: EmbeddingRequest, request_id: str, created: int) -> dict[str, Any]:
    """The OpenAI `list` of `embedding` objects vLLM answers, float or base64 (float32 LE)."""
    data: list[dict[str, Any]] = []
    for index, text in enumerate(request.inputs):
        vector = embedding_vector(text, request.dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if request.base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "id": request_id,
        "object": "list",
        "created": created,
        "model": request.model,
        "data": data,
        "usage": {
            "prompt_tokens": request.prompt_tokens,
            "total_tokens": request.prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
        },
    }

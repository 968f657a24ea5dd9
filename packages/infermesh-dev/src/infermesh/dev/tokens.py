"""A cheap deterministic tokenizer and filler text for the emulators.

About four characters per token, like BPE on English, with ids stable across processes so that
prefix-cache block hashes agree between runs. Never meant to match any real model's tokenizer.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CHARS_PER_TOKEN",
    "VOCAB_SIZE",
    "chat_prompt_text",
    "count_tokens",
    "filler_text",
    "filler_token",
    "tokenize",
]

CHARS_PER_TOKEN = 4
VOCAB_SIZE = 128_000

# fmt: off
_FILLER_WORDS = (
    "the", "mesh", "routes", "each", "request", "to", "the", "replica", "that", "can", "answer",
    "it", "soonest", "while", "keeping", "shared", "prompt", "prefixes", "warm", "in", "one",
    "cache", "so", "that", "prefill", "work", "is", "not", "repeated", "and", "tail", "latency",
    "stays", "low", "under", "load", "across", "heterogeneous", "accelerators",
)
# fmt: on


def tokenize(text: str) -> list[int]:
    """Token ids of `text`: one per `CHARS_PER_TOKEN` characters, the last one possibly shorter."""
    return [
        zlib.crc32(text[i : i + CHARS_PER_TOKEN].encode()) % VOCAB_SIZE
        for i in range(0, len(text), CHARS_PER_TOKEN)
    ]


def count_tokens(text: str) -> int:
    """Number of tokens `tokenize(text)` would return, without computing them."""
    return -(-len(text) // CHARS_PER_TOKEN)


def filler_token(index: int, offset: int = 0) -> str:
    """The text of generated token number `index` (0-based): words separated by spaces.

    `offset` shifts where in the filler text an answer starts (the emulator's `--seed`).
    """
    word = _FILLER_WORDS[(index + offset) % len(_FILLER_WORDS)]
    return word if index == 0 else " " + word


@functools.lru_cache(maxsize=1024)
def filler_text(num_tokens: int, offset: int = 0) -> str:
    """The whole answer of `num_tokens` generated tokens (cached: answers repeat a lot)."""
    return "".join(filler_token(index, offset) for index in range(num_tokens))


def _content_text(content: Any) -> str:
    """Text of a chat message's content: a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise ValueError(f"message content must be a string or a list of parts, got {content!r}")


def chat_prompt_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt a chat template would produce: role headers, contents, then the reply header.

    Identical leading messages give an identical leading prompt, which is what the prefix cache
    needs. Raises ValueError for a message without a string `role`.
    """
    pieces: list[str] = []
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(role, str):
            raise ValueError(f"messages[{position}] must be an object with a string 'role'")
        pieces.append(f"<|{role}|>\n{_content_text(message.get('content'))}<|end|>\n")
    pieces.append("<|assistant|>\n")
    return "".join(pieces)

"""Token counts of a relayed response, read from its tail without parsing or keeping the body.

OpenAI-compatible runtimes put `usage` at the end of a JSON response and in the last SSE event
before `[DONE]` (with `stream_options.include_usage`). The scanner keeps only the last two chunks
and counts SSE `data:` events as a fallback estimate of streamed tokens. Pure; no I/O.
"""

from __future__ import annotations

import re

__all__ = ["UsageScanner"]

_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_SSE_DATA = b"data:"


class UsageScanner:
    """Feed every relayed chunk; `counts()` gives (prompt, completion) tokens when known."""

    __slots__ = ("_last", "_prev", "events", "stream")

    def __init__(self, stream: bool) -> None:
        self.stream = stream
        self._prev = b""
        self._last = b""
        self.events = 0
        """SSE `data:` events seen (including `[DONE]`)."""

    def feed(self, chunk: bytes) -> None:
        self._prev = self._last
        self._last = chunk
        if self.stream:
            self.events += chunk.count(_SSE_DATA)

    def counts(self) -> tuple[int | None, int]:
        """(prompt tokens or None, completion tokens) from the last `usage` seen.

        Without a `usage` object, a stream's completion tokens are estimated as one per data
        event (vLLM sends one token per event), less the `[DONE]` event.
        """
        tail = self._prev + self._last
        completion = _COMPLETION_TOKENS.findall(tail)
        prompt = _PROMPT_TOKENS.findall(tail)
        prompt_tokens = int(prompt[-1]) if prompt else None
        if completion:
            return prompt_tokens, int(completion[-1])
        if self.stream:
            return prompt_tokens, max(0, self.events - 1)
        return prompt_tokens, 0

"""The retry budget: gRFC A6 `retryThrottling`, so retries cannot multiply an outage's load.

A token bucket shared by every request of one router: it starts full at `max_tokens`; each failed
attempt takes one token, each successful one returns `token_ratio`; a retry on another target is
allowed only while more than half the tokens are left. When runtimes fail broadly, retries stop
after a few failures and come back as successes refill the bucket. Pure: no clock, no I/O.
"""

from __future__ import annotations

from infermesh.core.config import RetryConfig

__all__ = ["RetryBudget"]


class RetryBudget:
    """Whether the router may retry now; fed every attempt's success or failure."""

    __slots__ = ("max_tokens", "token_ratio", "tokens")

    def __init__(self, config: RetryConfig) -> None:
        if config.max_tokens <= 0 or config.token_ratio < 0:
            raise ValueError(
                "retry budget needs max_tokens > 0 and token_ratio >= 0, got "
                f"{config.max_tokens}, {config.token_ratio}"
            )
        self.max_tokens = config.max_tokens
        self.token_ratio = config.token_ratio
        self.tokens = config.max_tokens

    def on_failure(self) -> None:
        self.tokens = max(0.0, self.tokens - 1.0)

    def on_success(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)

    def allows_retry(self) -> bool:
        """True while more than half the tokens are left (gRFC A6's threshold)."""
        return self.tokens > self.max_tokens / 2

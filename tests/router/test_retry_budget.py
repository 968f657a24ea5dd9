"""The retry budget: gRFC A6 retryThrottling arithmetic."""

from __future__ import annotations

import pytest

from infermesh.core.config import RetryConfig
from infermesh.router.retry_budget import RetryBudget


def test_retries_stop_once_half_the_tokens_are_gone_and_resume_with_successes() -> None:
    budget = RetryBudget(RetryConfig(max_tokens=10, token_ratio=0.1))
    for _ in range(4):
        budget.on_failure()
    assert budget.allows_retry()  # 6 > 5
    budget.on_failure()
    assert not budget.allows_retry()  # 5 is not > 5
    for _ in range(10):
        budget.on_success()
    assert budget.allows_retry()


def test_tokens_stay_within_zero_and_the_maximum() -> None:
    budget = RetryBudget(RetryConfig(max_tokens=3, token_ratio=1.0))
    for _ in range(10):
        budget.on_failure()
    assert budget.tokens == 0
    for _ in range(10):
        budget.on_success()
    assert budget.tokens == 3


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_tokens > 0"):
        RetryBudget(RetryConfig(max_tokens=0))

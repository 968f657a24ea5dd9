"""Tenant quotas on a fake clock: requests/s and tokens/s buckets, concurrency, `*`, updates."""

from __future__ import annotations

import pytest

from infermesh.core.policy import TenantQuota
from infermesh.router.quotas import QuotaGrant, QuotaRefusal, TenantQuotas


def granted(verdict: QuotaGrant | QuotaRefusal) -> QuotaGrant:
    assert isinstance(verdict, QuotaGrant), verdict
    return verdict


def refused(verdict: QuotaGrant | QuotaRefusal) -> QuotaRefusal:
    assert isinstance(verdict, QuotaRefusal), verdict
    return verdict


def test_a_tenant_without_a_quota_and_no_star_entry_is_unlimited() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(requests_per_s=1)})
    for _ in range(100):
        granted(quotas.acquire("other", 1000, 0.0))
    assert quotas.tracked() == 0


def test_the_star_quota_applies_to_each_unnamed_tenant_separately() -> None:
    quotas = TenantQuotas({"*": TenantQuota(requests_per_s=1)})
    granted(quotas.acquire("a", 0, 0.0))
    granted(quotas.acquire("b", 0, 0.0))
    refused(quotas.acquire("a", 0, 0.0))


def test_requests_per_s_refuses_the_excess_and_says_when_to_retry() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(requests_per_s=2)})
    granted(quotas.acquire("acme", 0, 0.0))
    granted(quotas.acquire("acme", 0, 0.0))
    refusal = refused(quotas.acquire("acme", 0, 0.0))
    assert refusal.reason == "quota_requests"
    assert refusal.retry_after_s == pytest.approx(0.5)
    assert "tenant 'acme'" in refusal.message
    assert "2 requests/s" in refusal.message
    granted(quotas.acquire("acme", 0, 0.5))


def test_tokens_per_s_charges_the_prompt_estimate_then_the_real_usage() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(tokens_per_s=100)})
    grant = granted(quotas.acquire("acme", 40, 0.0))
    # 40 estimated; really 50 prompt + 150 completion tokens: 100 - 200 = 100 tokens of debt.
    quotas.release(grant, 0.0, prompt_tokens=50, completion_tokens=150)
    refusal = refused(quotas.acquire("acme", 10, 0.5))
    assert refusal.reason == "quota_tokens"
    assert refusal.retry_after_s == pytest.approx(0.51)
    granted(quotas.acquire("acme", 10, 1.01))


def test_one_large_request_is_let_in_and_the_next_waits_for_the_debt() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(tokens_per_s=10)})
    granted(quotas.acquire("acme", 1000, 0.0))
    refused(quotas.acquire("acme", 1, 1.0))


def test_concurrent_requests_are_capped_and_a_finished_one_makes_room() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(concurrent=1)})
    grant = granted(quotas.acquire("acme", 0, 0.0))
    refusal = refused(quotas.acquire("acme", 0, 0.0))
    assert refusal.reason == "quota_concurrent"
    quotas.release(grant, 1.0)
    quotas.release(grant, 1.0)  # twice: no extra room
    granted(quotas.acquire("acme", 0, 1.0))
    refused(quotas.acquire("acme", 0, 1.0))


def test_a_refused_request_takes_nothing_from_the_other_buckets() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(requests_per_s=1, concurrent=1)})
    grant = granted(quotas.acquire("acme", 0, 0.0))
    refused(quotas.acquire("acme", 0, 5.0))  # concurrency: requests bucket untouched
    quotas.release(grant, 5.0)
    granted(quotas.acquire("acme", 0, 5.0))


def test_a_changed_quota_starts_afresh_and_a_removed_one_lifts_the_limit() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(requests_per_s=1)})
    granted(quotas.acquire("acme", 0, 0.0))
    refused(quotas.acquire("acme", 0, 0.0))
    quotas.update({"acme": TenantQuota(requests_per_s=5)}, 0.0)
    for _ in range(5):
        granted(quotas.acquire("acme", 0, 0.0))
    quotas.update({}, 0.0)
    for _ in range(10):
        granted(quotas.acquire("acme", 0, 0.0))


def test_idle_tenants_with_full_buckets_are_forgotten() -> None:
    quotas = TenantQuotas({"*": TenantQuota(requests_per_s=1)})
    for i in range(5000):
        quotas.release(granted(quotas.acquire(f"tenant-{i}", 0, float(i))), float(i))
    assert quotas.tracked() < 5000


def test_a_refunded_request_gives_back_its_request_tokens_and_concurrency() -> None:
    quotas = TenantQuotas({"acme": TenantQuota(requests_per_s=1, tokens_per_s=50, concurrent=1)})
    grant = granted(quotas.acquire("acme", 50, 0.0))
    quotas.refund(grant, 0.0)
    quotas.release(grant, 0.0, completion_tokens=1000)  # after a refund: nothing more
    assert quotas.in_flight("acme") == 0
    granted(quotas.acquire("acme", 50, 0.0))

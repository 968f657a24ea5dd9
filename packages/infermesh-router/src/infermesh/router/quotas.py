"""Per-tenant quotas from the operator policy: requests/s, tokens/s and concurrent requests.

A tenant (the `x-infermesh-tenant` header) is limited by its own `quotas` entry, else by the `*`
entry (each tenant gets its own buckets), else not at all. Requests/s is a token bucket holding
one second of requests; tokens/s is charged the prompt estimate on admission, may go into debt,
and is corrected with the real prompt and completion tokens when the request ends. Pure: `now`
is passed in; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from infermesh.core.policy import TenantQuota

__all__ = ["QuotaGrant", "QuotaRefusal", "TenantQuotas", "TokenBucket"]

ANY_TENANT = "*"
SWEEP_EVERY = 4096
"""Admissions between sweeps that forget tenants with full buckets and nothing in flight."""


@attrs.define
class TokenBucket:
    """`rate` per second refills up to `capacity`; `level` may go below 0 (debt)."""

    rate: float
    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, rate: float, now: float, burst_s: float = 1.0) -> TokenBucket:
        capacity = max(1.0, rate * burst_s)
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until `level` reaches `need` (0 when it has); call `refill` first."""
        return max(0.0, (need - self.level) / self.rate)

    def add(self, amount: float, now: float) -> None:
        """Put back (or, negative, take) `amount`, never above `capacity`."""
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)

    def is_full(self) -> bool:
        return self.level >= self.capacity


@attrs.define
class _TenantState:
    quota: TenantQuota
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


@attrs.define(eq=False)
class QuotaGrant:
    """What a request took from its tenant's quota; give it back with `TenantQuotas.release`."""

    tenant: str
    charged_tokens: int
    released: bool = False


@attrs.frozen
class QuotaRefusal:
    """The tenant is over a quota: `reason` is `quota_concurrent`, `quota_requests` or
    `quota_tokens`."""

    reason: str
    retry_after_s: float
    message: str


class TenantQuotas:
    """Every tenant's buckets and in-flight count, under the policy's `quotas` (see `update`)."""

    def __init__(self, quotas: Mapping[str, TenantQuota] | None = None) -> None:
        self._quotas: Mapping[str, TenantQuota] = dict(quotas or {})
        self._tenants: dict[str, _TenantState] = {}
        self._since_sweep = 0

    def update(self, quotas: Mapping[str, TenantQuota], now: float) -> None:
        """A new policy: tenants whose quota changed start again with full buckets (their
        in-flight requests still count)."""
        self._quotas = dict(quotas)
        for tenant, state in list(self._tenants.items()):
            quota = self.quota_for(tenant)
            if quota is None:
                if state.in_flight == 0:
                    del self._tenants[tenant]
            elif quota != state.quota:
                fresh = _fresh(quota, now)
                fresh.in_flight = state.in_flight
                self._tenants[tenant] = fresh

    def quota_for(self, tenant: str) -> TenantQuota | None:
        """The tenant's own entry, else `*`, else None (unlimited)."""
        return self._quotas.get(tenant) or self._quotas.get(ANY_TENANT)

    def acquire(self, tenant: str, prompt_tokens: int, now: float) -> QuotaGrant | QuotaRefusal:
        """Take one request (and its prompt estimate in tokens) from the tenant's quota."""
        quota = self.quota_for(tenant)
        if quota is None:
            return QuotaGrant(tenant, 0)
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self._sweep(now)
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = _fresh(quota, now)
        who = f"tenant {tenant!r}" if tenant else "requests without x-infermesh-tenant"
        if quota.concurrent is not None and state.in_flight >= quota.concurrent:
            return QuotaRefusal(
                "quota_concurrent",
                1.0,
                f"{who} has {state.in_flight} requests in flight, its quota of concurrent "
                f"requests ({quota.concurrent}); retry when one has finished",
            )
        if state.requests is not None:
            state.requests.refill(now)
            wait_s = state.requests.wait_s(1.0)
            if wait_s > 0:
                return QuotaRefusal(
                    "quota_requests",
                    wait_s,
                    f"{who} is over its quota of {quota.requests_per_s:g} requests/s; "
                    f"retry in {math.ceil(wait_s)} s",
                )
        if state.tokens is not None:
            state.tokens.refill(now)
            if state.tokens.level <= 0:
                wait_s = state.tokens.wait_s(1.0)
                return QuotaRefusal(
                    "quota_tokens",
                    wait_s,
                    f"{who} is over its quota of {quota.tokens_per_s:g} tokens/s; "
                    f"retry in {math.ceil(wait_s)} s",
                )
        if state.requests is not None:
            state.requests.level -= 1.0
        if state.tokens is not None:
            state.tokens.level -= prompt_tokens
        state.in_flight += 1
        return QuotaGrant(tenant, prompt_tokens)

    def release(
        self, grant: QuotaGrant, now: float, prompt_tokens: int = 0, completion_tokens: int = 0
    ) -> None:
        """The request is over: free its concurrency and charge the tokens it really used
        (`prompt_tokens` 0 keeps the estimate). Releasing twice does nothing."""
        state = self._close(grant)
        if state is not None and state.tokens is not None:
            correction = (prompt_tokens - grant.charged_tokens) if prompt_tokens else 0
            state.tokens.add(-(correction + completion_tokens), now)

    def refund(self, grant: QuotaGrant, now: float) -> None:
        """The request was refused after its quota was taken (e.g. shed for saturation): give
        back its request, its tokens and its concurrency. Does nothing after `release`."""
        state = self._close(grant)
        if state is not None and state.requests is not None:
            state.requests.add(1.0, now)
        if state is not None and state.tokens is not None:
            state.tokens.add(grant.charged_tokens, now)

    def _close(self, grant: QuotaGrant) -> _TenantState | None:
        """Mark the grant done and free its concurrency; its tenant's state, if still held."""
        if grant.released:
            return None
        grant.released = True
        state = self._tenants.get(grant.tenant)
        if state is not None:
            state.in_flight = max(0, state.in_flight - 1)
        return state

    def in_flight(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.in_flight if state is not None else 0

    def tracked(self) -> int:
        """Tenants with buckets held in memory."""
        return len(self._tenants)

    def _sweep(self, now: float) -> None:
        # A tenant with full buckets and nothing in flight is the same as a fresh one.
        self._since_sweep = 0
        for tenant, state in list(self._tenants.items()):
            if state.in_flight:
                continue
            buckets = [b for b in (state.requests, state.tokens) if b is not None]
            for bucket in buckets:
                bucket.refill(now)
            if all(bucket.is_full() for bucket in buckets):
                del self._tenants[tenant]


def _fresh(quota: TenantQuota, now: float) -> _TenantState:
    requests = TokenBucket.full(quota.requests_per_s, now) if quota.requests_per_s else None
    tokens = TokenBucket.full(quota.tokens_per_s, now) if quota.tokens_per_s else None
    return _TenantState(quota, requests, tokens)

"""The admission gate a request passes before forwarding: 429s, waits, policy, quota settling."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import orjson
import pytest

from infermesh.core.config import (
    AdmissionConfig,
    BatchAdmissionConfig,
    LatencyAdmissionConfig,
    SloAdmissionConfig,
)
from infermesh.core.model import ModelState, RequestFeatures, SloClass, TargetKey
from infermesh.core.policy import (
    AdmissionPolicy,
    PolicyKind,
    PolicySet,
    PolicyValue,
    SetPolicy,
    TenantQuota,
)
from infermesh.core.proto import scoring_pb2
from infermesh.router.admission_gate import LARGE_FLEET, LARGE_FLEET_REFRESH_S, AdmissionGate
from infermesh.router.errors import ApiError
from infermesh.router.metrics import RouterMetrics

from .conftest import wait_until

pytestmark = pytest.mark.anyio

MODEL = "llama"


def config(
    *, max_concurrent: int = 1, max_queue: int = 4, wait_s: float = 30.0, per_model: int = 1
) -> AdmissionConfig:
    return AdmissionConfig(
        max_concurrent_per_model=per_model,
        latency=LatencyAdmissionConfig(max_concurrent, max_queue, wait_s),
        standard=SloAdmissionConfig(max_concurrent, max_queue, wait_s),
        batch=BatchAdmissionConfig(max_concurrent, max_queue, wait_s),
    )


def request(slo: SloClass = SloClass.STANDARD, tenant: str = "", rid: str = "") -> RequestFeatures:
    return RequestFeatures(MODEL, slo_class=slo, tenant=tenant, prompt_tokens=10, request_id=rid)


def replicas(waiting: float) -> list[ModelState]:
    key = TargetKey(model=MODEL, node="n1", endpoint="http://r1")
    return [ModelState(key, waiting=waiting)]


def policy_of(kind: PolicyKind, *entries: tuple[str, PolicyValue]) -> PolicySet:
    policy = PolicySet()
    for name, value in entries:
        policy = policy.apply(SetPolicy(kind, name, value))
    return policy


def body_of(error: ApiError) -> dict[str, object]:
    parsed: dict[str, dict[str, object]] = orjson.loads(error.body())
    return parsed["error"]


async def test_a_full_queue_answers_429_overloaded_with_retry_after() -> None:
    gate = AdmissionGate(config(max_queue=0), RouterMetrics())
    async with gate.admit(request()):
        with pytest.raises(ApiError) as info:
            async with gate.admit(request()):
                pass
    error = info.value
    assert error.status == 429
    assert body_of(error)["code"] == "overloaded"
    assert dict(error.headers())[b"retry-after"] >= b"1"


async def test_a_queued_request_runs_when_the_one_ahead_finishes() -> None:
    gate = AdmissionGate(config(), RouterMetrics())
    order: list[str] = []

    async def second() -> None:
        async with gate.admit(request()) as admitted:
            order.append("second")
            assert admitted.queued_s >= 0

    async with gate.admit(request()):
        task = asyncio.create_task(second())
        await wait_until(lambda: gate.queues.queued(MODEL, SloClass.STANDARD) == 1, "queued")
        order.append("first")
    await task
    assert order == ["first", "second"]
    assert gate.queues.in_flight(MODEL, SloClass.STANDARD) == 0


async def test_latency_waiting_behind_batch_goes_first_when_the_slot_frees() -> None:
    gate = AdmissionGate(config(max_concurrent=5), RouterMetrics())
    order: list[SloClass] = []

    async def waiting(slo: SloClass) -> None:
        async with gate.admit(request(slo)):
            order.append(slo)

    async with gate.admit(request(SloClass.BATCH)):
        batch = asyncio.create_task(waiting(SloClass.BATCH))
        await wait_until(lambda: gate.queues.queued(MODEL, SloClass.BATCH) == 1, "batch queued")
        latency = asyncio.create_task(waiting(SloClass.LATENCY))
        await wait_until(lambda: gate.queues.queued(MODEL, SloClass.LATENCY) == 1, "queued")
    await asyncio.gather(batch, latency)
    assert order == [SloClass.LATENCY, SloClass.BATCH]


async def test_a_request_that_waits_past_max_queue_wait_gets_429() -> None:
    gate = AdmissionGate(config(wait_s=0.05), RouterMetrics())
    async with gate.admit(request()):
        with pytest.raises(ApiError) as info:
            async with gate.admit(request()):
                pass
    assert info.value.status == 429
    assert "max_queue_wait_s" in info.value.message
    assert gate.queues.queued(MODEL, SloClass.STANDARD) == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    gate = AdmissionGate(config(), RouterMetrics())

    async def waiter() -> None:
        async with gate.admit(request()):
            pytest.fail("must not be admitted")

    async with gate.admit(request()):
        task = asyncio.create_task(waiter())
        await wait_until(lambda: gate.queues.queued(MODEL, SloClass.STANDARD) == 1, "queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert gate.queues.queued(MODEL, SloClass.STANDARD) == 0


async def test_saturated_replicas_shed_batch_but_let_latency_through() -> None:
    fleet: dict[str, Sequence[ModelState]] = {MODEL: replicas(waiting=7.0)}
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), fleet=fleet.get, retry_after_s=3.0)
    with pytest.raises(ApiError) as info:
        async with gate.admit(request(SloClass.BATCH)):
            pass
    assert info.value.status == 429
    assert body_of(info.value)["code"] == "overloaded"
    assert "saturated" in info.value.message
    assert dict(info.value.headers())[b"retry-after"] == b"3"
    async with gate.admit(request(SloClass.STANDARD)):
        pass
    async with gate.admit(request(SloClass.LATENCY)):
        pass


async def test_a_model_no_replica_serves_is_left_to_the_forwarder() -> None:
    gate = AdmissionGate(config(max_queue=0), RouterMetrics(), fleet=lambda model: ())
    async with gate.admit(request()), gate.admit(request()):
        pass


async def test_policy_admission_entries_override_the_config_per_model_and_class() -> None:
    policy = policy_of(
        PolicyKind.ADMISSION,
        ("batch-small", AdmissionPolicy(MODEL, SloClass.BATCH, max_concurrent=1, max_queue=0)),
        ("latency-shed", AdmissionPolicy("*", SloClass.LATENCY, shed_at_load=0.5)),
    )
    fleet: dict[str, Sequence[ModelState]] = {MODEL: replicas(waiting=6.0)}
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), fleet=fleet.get, policy=lambda: policy)
    with pytest.raises(ApiError, match="saturated"):
        async with gate.admit(request(SloClass.LATENCY)):
            pass
    fleet[MODEL] = replicas(waiting=0.0)
    async with gate.admit(request(SloClass.BATCH)):
        with pytest.raises(ApiError, match="max_queue 0"):
            async with gate.admit(request(SloClass.BATCH)):
                pass
        async with gate.admit(request(SloClass.STANDARD)):
            pass


async def test_tenant_quota_refusal_is_openai_rate_limit_exceeded() -> None:
    policy = policy_of(PolicyKind.QUOTAS, ("acme", TenantQuota(requests_per_s=1)))
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), policy=lambda: policy)
    async with gate.admit(request(tenant="acme")):
        pass
    with pytest.raises(ApiError) as info:
        async with gate.admit(request(tenant="acme")):
            pass
    assert info.value.status == 429
    assert body_of(info.value) == {
        "message": info.value.message,
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    assert b"retry-after" in dict(info.value.headers())
    async with gate.admit(request(tenant="someone-else")):
        pass


async def test_reported_completion_tokens_are_charged_to_the_tenant() -> None:
    policy = policy_of(PolicyKind.QUOTAS, ("acme", TenantQuota(tokens_per_s=100)))
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), policy=lambda: policy)
    async with gate.admit(request(tenant="acme", rid="r1")):
        gate.outcome(scoring_pb2.Outcome(request_id="r1", prompt_tokens=10, completion_tokens=5000))
    with pytest.raises(ApiError) as info:
        async with gate.admit(request(tenant="acme", rid="r2")):
            pass
    assert body_of(info.value)["type"] == "tokens"


async def test_metrics_show_waits_refusals_and_levels() -> None:
    metrics = RouterMetrics()
    gate = AdmissionGate(config(max_queue=0), metrics)
    async with gate.admit(request()):
        with pytest.raises(ApiError):
            async with gate.admit(request()):
                pass
        text = metrics.render().decode()
        assert (
            'infermesh_router_admission_in_flight{model="llama",slo_class="standard"} 1.0' in text
        )
    text = metrics.render().decode()
    assert (
        'infermesh_router_admission_rejected_total{model="llama",reason="queue_full",'
        'slo_class="standard"} 1.0' in text
    )
    assert 'infermesh_router_admission_queue_wait_seconds_count{model="llama",' in text
    assert 'infermesh_router_admission_in_flight{model="llama",slo_class="standard"} 0.0' in text


async def test_a_request_refused_by_admission_is_not_charged_to_its_tenant() -> None:
    policy = policy_of(PolicyKind.QUOTAS, ("acme", TenantQuota(requests_per_s=1)))
    gate = AdmissionGate(config(max_queue=0), RouterMetrics(), policy=lambda: policy)
    async with gate.admit(request(tenant="other")):
        with pytest.raises(ApiError, match="max_queue"):
            async with gate.admit(request(tenant="acme")):
                pass
    async with gate.admit(request(tenant="acme")):
        pass


async def test_the_fleet_counts_as_saturated_for_hedging_once_any_class_is_shed() -> None:
    fleet: dict[str, Sequence[ModelState]] = {MODEL: replicas(waiting=4.0)}
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), fleet=fleet.get)
    assert not gate.saturated(MODEL)
    fleet[MODEL] = replicas(waiting=7.0)  # above batch's 0.8
    assert gate.saturated(MODEL)
    assert not gate.saturated("unknown-model")
    assert not AdmissionGate(AdmissionConfig(), RouterMetrics()).saturated(MODEL)


def many_replicas(count: int, waiting: float) -> tuple[ModelState, ...]:
    return tuple(
        ModelState(TargetKey(model=MODEL, node=f"n{i}", endpoint=f"http://r{i}"), waiting=waiting)
        for i in range(count)
    )


async def test_a_big_fleets_saturation_follows_its_telemetry_within_the_refresh_interval() -> None:
    # Above LARGE_FLEET replicas the candidates change on almost every delta; averaging them
    # per request would cost the router ~1 µs a replica, so the mean is refreshed at most
    # every LARGE_FLEET_REFRESH_S of the gate's clock. A small fleet follows every change.
    now = [100.0]
    fleet: dict[str, Sequence[ModelState]] = {MODEL: many_replicas(LARGE_FLEET + 1, 4.0)}
    gate = AdmissionGate(AdmissionConfig(), RouterMetrics(), fleet=fleet.get, clock=lambda: now[0])
    assert not gate.saturated(MODEL)
    fleet[MODEL] = many_replicas(LARGE_FLEET + 1, 7.0)  # above batch's 0.8
    assert not gate.saturated(MODEL)  # within the refresh interval: the last mean
    now[0] += LARGE_FLEET_REFRESH_S * 1.01
    assert gate.saturated(MODEL)
    fleet[MODEL] = many_replicas(LARGE_FLEET + 1, 0.0)
    now[0] += LARGE_FLEET_REFRESH_S / 2
    assert gate.saturated(MODEL)
    now[0] += LARGE_FLEET_REFRESH_S * 0.51
    assert not gate.saturated(MODEL)

    small: dict[str, Sequence[ModelState]] = {MODEL: many_replicas(LARGE_FLEET, 4.0)}
    exact = AdmissionGate(AdmissionConfig(), RouterMetrics(), fleet=small.get, clock=lambda: 0.0)
    assert not exact.saturated(MODEL)
    small[MODEL] = many_replicas(LARGE_FLEET, 7.0)
    assert exact.saturated(MODEL)

"""The Control API's policy RPCs on a real grpc.aio server on loopback with mutual TLS, over a
local policy store: what each role may call, what a change looks like to the next reader, and
the gRPC status and message a refused or invalid call gets."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest

from infermesh.agent.api.control import ControlService
from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.policy.local import LocalPolicyStore
from infermesh.agent.policy.remote import PolicyPermissionError
from infermesh.agent.tls import ClientIdentityInterceptor, channel_credentials, server_credentials
from infermesh.core.policy import AclEntry, NotLeaderError, PolicyStoreContext, Role, SetPolicy
from infermesh.core.policy import PolicyKind as Kind
from infermesh.core.proto import control_pb2, control_pb2_grpc

pytestmark = pytest.mark.anyio

DEADLINE_S = 5.0
DRAINED_AT = 1_700_000_000.0


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_ca_dir(directory, days=2)
    issue_to_dir(directory, Identity("node-1", "node"), hosts=["127.0.0.1"])
    issue_to_dir(directory, Identity("grafana", "viewer"))
    issue_to_dir(directory, Identity("ci-bot", "operator"))
    issue_to_dir(directory, Identity("alice", "admin"))
    return directory


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LocalPolicyStore]:
    policy_store = LocalPolicyStore(PolicyStoreContext("node-1", str(tmp_path / "policy")))
    await policy_store.start()
    try:
        yield policy_store
    finally:
        await policy_store.aclose()


@pytest.fixture
async def address(pki: Path, store: LocalPolicyStore) -> AsyncIterator[str]:
    server = grpc.aio.server(interceptors=[ClientIdentityInterceptor()])
    control_pb2_grpc.add_ControlServicer_to_server(
        ControlService(store, clock=lambda: DRAINED_AT), server
    )
    credentials = server_credentials(pki / "node-1.pem", pki / "node-1-key.pem", pki / "ca.pem")
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def _channel(pki: Path, address: str, user: str | None) -> grpc.aio.Channel:
    if user is None:
        credentials = channel_credentials(pki / "ca.pem")
    else:
        credentials = channel_credentials(
            pki / "ca.pem", pki / f"{user}.pem", pki / f"{user}-key.pem"
        )
    return grpc.aio.secure_channel(address, credentials)


async def test_viewer_can_read_the_policy_but_not_change_it(pki: Path, address: str) -> None:
    async with _channel(pki, address, "grafana") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        policy = await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
        assert policy.revision == 0
        assert json.loads(policy.json) == {"version": 1, "revision": 0}
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.SetPolicy(
                control_pb2.SetPolicyRequest(kind="quotas", name="acme", value_json="{}"),
                timeout=DEADLINE_S,
            )
        with pytest.raises(grpc.aio.AioRpcError) as drain_refused:
            await control.DrainNode(control_pb2.DrainNodeRequest(node="gpu-1"), timeout=DEADLINE_S)
        unchanged = await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "grafana has role viewer, which may not call SetPolicy"
    assert drain_refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert unchanged.revision == 0


async def test_operator_drains_a_node_and_every_reader_sees_it(pki: Path, address: str) -> None:
    async with _channel(pki, address, "ci-bot") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        drained = await control.DrainNode(
            control_pb2.DrainNodeRequest(node="gpu-3", reason="kernel upgrade"),
            timeout=DEADLINE_S,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.DeletePolicy(
                control_pb2.DeletePolicyRequest(kind="drains", name="gpu-3"), timeout=DEADLINE_S
            )
    assert drained.revision == 1
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with _channel(pki, address, "grafana") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        policy = await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
        listed = await control.ListPolicies(
            control_pb2.ListPoliciesRequest(kind="drains"), timeout=DEADLINE_S
        )
    assert json.loads(policy.json)["drains"] == {
        "gpu-3": {"reason": "kernel upgrade", "since": DRAINED_AT}
    }
    assert [(e.kind, e.name, json.loads(e.value_json)) for e in listed.entries] == [
        ("drains", "gpu-3", {"reason": "kernel upgrade", "since": DRAINED_AT})
    ]
    async with _channel(pki, address, "ci-bot") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        undrained = await control.UndrainNode(
            control_pb2.UndrainNodeRequest(node="gpu-3"), timeout=DEADLINE_S
        )
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await control.UndrainNode(
                control_pb2.UndrainNodeRequest(node="gpu-3"), timeout=DEADLINE_S
            )
    assert "drains" not in json.loads(undrained.json)
    assert again.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert again.value.details() == "drains['gpu-3']: node is not drained"


async def test_admin_sets_a_policy_and_a_bad_one_is_refused_naming_the_field(
    pki: Path, address: str
) -> None:
    async with _channel(pki, address, "alice") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        value = {"model": "llama", "weights": {"queue": 2.0}, "max_waiting": 8}
        changed = await control.SetPolicy(
            control_pb2.SetPolicyRequest(
                kind="scoring", name="llama", value_json=json.dumps(value)
            ),
            timeout=DEADLINE_S,
        )
        failures = {}
        for label, request in {
            "negative": control_pb2.SetPolicyRequest(
                kind="scoring", name="llama", value_json='{"max_waiting": -1}'
            ),
            "wrong type": control_pb2.SetPolicyRequest(
                kind="pins", name="llama", value_json='{"nodes": ["a"], "min_replicas": "two"}'
            ),
            "unknown kind": control_pb2.SetPolicyRequest(kind="colour", name="x"),
            "not json": control_pb2.SetPolicyRequest(kind="quotas", name="a", value_json="{"),
        }.items():
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await control.SetPolicy(request, timeout=DEADLINE_S)
            failures[label] = (refused.value.code(), refused.value.details() or "")
        after = await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
    assert changed.revision == 1
    assert json.loads(changed.json)["scoring"] == {"llama": value}
    assert {code for code, _ in failures.values()} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert failures["negative"][1] == "scoring['llama'].max_waiting: must be >= 0, got -1"
    assert failures["wrong type"][1] == (
        "pins['llama'].min_replicas: must be an integer, got 'two'"
    )
    assert failures["unknown kind"][1].startswith("unknown policy kind 'colour'")
    assert failures["not json"][1].startswith("value_json: not JSON")
    assert after.revision == 1


async def test_an_acl_entry_overrides_the_certificate_role(
    pki: Path, address: str, store: LocalPolicyStore
) -> None:
    await store.submit(SetPolicy(Kind.ACLS, "grafana", AclEntry(Role.OPERATOR)))
    await store.submit(SetPolicy(Kind.ACLS, "spiffe://infermesh/admin/alice", AclEntry()))
    async with _channel(pki, address, "grafana") as channel:
        promoted = control_pb2_grpc.ControlStub(channel)
        drained = await promoted.DrainNode(
            control_pb2.DrainNodeRequest(node="gpu-1"), timeout=DEADLINE_S
        )
    async with _channel(pki, address, "alice") as channel:
        demoted = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await demoted.DeletePolicy(
                control_pb2.DeletePolicyRequest(kind="acls", name="grafana"), timeout=DEADLINE_S
            )
    assert "gpu-1" in json.loads(drained.json)["drains"]
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "alice has role viewer, which may not call DeletePolicy"


async def test_a_write_without_a_leader_is_unavailable_and_says_so(
    pki: Path, address: str, store: LocalPolicyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_quorum(command: object) -> None:
        raise NotLeaderError("no quorum within 5 s")

    monkeypatch.setattr(store, "submit", no_quorum)
    async with _channel(pki, address, "alice") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.DrainNode(control_pb2.DrainNodeRequest(node="gpu-1"), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert refused.value.details() == (
        "the change was not committed (no quorum within 5 s); no leader is known; retry later"
    )


async def test_a_voter_refusing_a_forwarded_write_is_permission_denied_with_its_reason(
    pki: Path, address: str, store: LocalPolicyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a non-voter's `remote` store raises when the voter it forwarded to refuses the caller.
    async def voter_refuses(command: object) -> None:
        raise PolicyPermissionError("voter 10.0.0.1:7960: ci-bot has role viewer")

    monkeypatch.setattr(store, "submit", voter_refuses)
    async with _channel(pki, address, "ci-bot") as channel:
        control = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.DrainNode(control_pb2.DrainNodeRequest(node="gpu-1"), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "voter 10.0.0.1:7960: ci-bot has role viewer"


async def test_a_client_without_a_certificate_is_refused_quickly(pki: Path, address: str) -> None:
    started = time.monotonic()
    async with _channel(pki, address, None) as channel:
        control = control_pb2_grpc.ControlStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < DEADLINE_S


async def test_server_only_tls_without_the_interceptor_still_needs_an_identity(
    pki: Path, store: LocalPolicyStore
) -> None:
    """Without the interceptor the servicer reads the certificate itself, and finds none."""
    server = grpc.aio.server()
    control_pb2_grpc.add_ControlServicer_to_server(ControlService(store), server)
    key, cert = (pki / "node-1-key.pem").read_bytes(), (pki / "node-1.pem").read_bytes()
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    await server.start()
    try:
        async with _channel(pki, f"127.0.0.1:{port}", None) as channel:
            control = control_pb2_grpc.ControlStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await control.GetPolicy(control_pb2.GetPolicyRequest(), timeout=DEADLINE_S)
    finally:
        await server.stop(grace=None)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client certificate" in (refused.value.details() or "")

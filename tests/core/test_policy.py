"""The policy model: every command validates, names the field it rejects, and bumps the revision."""

from __future__ import annotations

import json
import tomllib

import pytest

from infermesh.core.model import SloClass
from infermesh.core.policy import (
    AclEntry,
    DeletePolicy,
    Drain,
    DrainNode,
    HedgingPolicy,
    Pin,
    PolicyCommand,
    PolicyError,
    PolicyKind,
    PolicySet,
    Role,
    ScoringPolicy,
    SetPolicy,
    TenantQuota,
    UndrainNode,
    command_from_document,
    command_to_document,
)

DOCUMENT_TOML = """
version = 1

[scoring.llama-latency]
model = "llama"
slo_class = "latency"
weights = { queue = 2.0, prefix = 0.5 }
max_kv_cache_usage = 0.9

[scoring.default]
weights = { queue = 1.0 }

[admission.llama]
model = "llama"
max_concurrent = 64
shed_at_load = 0.9

[hedging.all]
delay_s = 0.25

[pins.llama]
nodes = ["gpu-1", "gpu-2"]
min_replicas = 2

[drains.gpu-3]
reason = "kernel upgrade"
since = 1700000000.0

[quotas.acme]
requests_per_s = 50
concurrent = 10

[acls."ops@example.com"]
role = "operator"
"""


def test_a_toml_document_round_trips_through_the_policy_set() -> None:
    policy = PolicySet.from_document(tomllib.loads(DOCUMENT_TOML))
    assert policy.pins["llama"] == Pin(("gpu-1", "gpu-2"), 2)
    assert policy.quotas["acme"] == TenantQuota(requests_per_s=50.0, concurrent=10)
    assert policy.acls["ops@example.com"].role is Role.OPERATOR
    assert policy.drains["gpu-3"].reason == "kernel upgrade"
    document = json.loads(json.dumps(policy.to_document()))
    assert PolicySet.from_document(document) == policy


def test_the_most_specific_scoring_policy_wins() -> None:
    policy = PolicySet.from_document(tomllib.loads(DOCUMENT_TOML))
    chosen = policy.scoring_for("llama", SloClass.LATENCY)
    assert chosen is not None
    assert chosen.weights == {"queue": 2.0, "prefix": 0.5}
    fallback = policy.scoring_for("llama", SloClass.BATCH)
    assert fallback is not None
    assert fallback.weights == {"queue": 1.0}
    assert policy.admission_for("mistral", SloClass.STANDARD) is None
    hedging = policy.hedging_for("mistral", SloClass.LATENCY)
    assert hedging is not None
    assert hedging.delay_s == 0.25


def test_every_applied_command_increments_the_revision() -> None:
    policy = PolicySet()
    policy = policy.apply(SetPolicy(PolicyKind.PINS, "llama", Pin(("a",), 1)))
    policy = policy.apply(DrainNode("a", "maintenance", 10.0))
    assert policy.revision == 2
    assert policy.drains == {"a": Drain("maintenance", 10.0)}
    policy = policy.apply(UndrainNode("a")).apply(DeletePolicy(PolicyKind.PINS, "llama"))
    assert policy.revision == 4
    assert not policy.drains
    assert not policy.pins


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (
            SetPolicy(PolicyKind.PINS, "llama", Pin(("a",), -1)),
            "pins['llama'].min_replicas: must be >= 0, got -1",
        ),
        (
            SetPolicy(PolicyKind.PINS, "llama", Pin(("a",), 2)),
            "pins['llama'].min_replicas: must be <= the 1 pinned nodes, got 2",
        ),
        (
            SetPolicy(PolicyKind.SCORING, "s", ScoringPolicy(weights={"queue": -1.0})),
            "scoring['s'].weights['queue']: must be >= 0, got -1.0",
        ),
        (
            SetPolicy(PolicyKind.HEDGING, "h", HedgingPolicy(delay_s=0)),
            "hedging['h'].delay_s: must be > 0, got 0",
        ),
        (
            SetPolicy(PolicyKind.QUOTAS, "t", TenantQuota(concurrent=0)),
            "quotas['t'].concurrent: must be >= 1, got 0",
        ),
        (
            SetPolicy(PolicyKind.ACLS, "x", Pin(("a",))),
            "acls['x']: must be a AclEntry, got Pin",
        ),
        (DeletePolicy(PolicyKind.QUOTAS, "nobody"), "quotas['nobody']: no such policy"),
        (UndrainNode("gpu-9"), "drains['gpu-9']: node is not drained"),
    ],
)
def test_an_invalid_command_is_rejected_naming_the_field(command: object, message: str) -> None:
    before = PolicySet()
    with pytest.raises(PolicyError) as caught:
        before.apply(command)  # type: ignore[arg-type]
    assert str(caught.value) == message
    assert before.revision == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            {"pins": {"m": {"nodes": ["a"], "min_replicas": "two"}}},
            "pins['m'].min_replicas: must be an integer, got 'two'",
        ),
        (
            {"acls": {"me": {"role": "root"}}},
            "acls['me'].role: must be one of admin, operator, viewer, got 'root'",
        ),
        ({"quotas": {"t": {"tokens_per_sec": 5}}}, "quotas['t'].tokens_per_sec: unknown key"),
        (
            {"scoring": {"s": {"slo_class": "urgent"}}},
            "scoring['s'].slo_class: must be one of latency, standard, batch",
        ),
        (
            {"admission": {"a": {"shed_at_load": 1.5}}},
            "admission['a'].shed_at_load: must be in (0, 1], got 1.5",
        ),
        ({"pin": {}}, "pin: unknown key"),
        ({"version": 2}, "version: this InferMesh reads version 1, got 2"),
    ],
)
def test_an_invalid_document_is_rejected_naming_the_field(
    document: dict[str, object], message: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        PolicySet.from_document(document)
    assert str(caught.value).startswith(message)


def test_commands_round_trip_as_json_documents() -> None:
    commands: list[PolicyCommand] = [
        SetPolicy(PolicyKind.ACLS, "ops", AclEntry(Role.ADMIN)),
        SetPolicy(PolicyKind.SCORING, "s", ScoringPolicy("llama", SloClass.BATCH, {"q": 1.0})),
        DeletePolicy(PolicyKind.PINS, "llama"),
        DrainNode("gpu-1", "reboot", 5.0),
        UndrainNode("gpu-1"),
    ]
    for command in commands:
        wire = json.dumps(command_to_document(command))
        assert command_from_document(json.loads(wire)) == command


def test_a_command_document_with_a_bad_value_names_the_field() -> None:
    with pytest.raises(PolicyError, match=r"pins\['m'\].nodes\[0\]: must be a string"):
        command_from_document({"op": "set", "kind": "pins", "name": "m", "value": {"nodes": [1]}})
    with pytest.raises(PolicyError, match="unknown policy kind 'pinz'"):
        command_from_document({"op": "delete", "kind": "pinz", "name": "m"})
    with pytest.raises(PolicyError, match=r"command\.op"):
        command_from_document({"op": "launch"})

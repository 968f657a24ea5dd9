"""The operator policy: typed, validated values and the commands that change them.

Sans-I/O: a `PolicySet` is an immutable value and `PolicySet.apply(command)` is a pure function,
so every Raft replica (or the one-node local store) reaches the same state from the same log.
Nothing here reads files, opens sockets or knows about Raft; `PolicyStore` is the protocol the
backends (plugins registered through `infermesh_register_policy_stores`) implement.
"""

from __future__ import annotations

import enum
import math
import types
import typing
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

import attrs

from infermesh.core.model import SloClass

__all__ = [
    "SCHEMA_VERSION",
    "AclEntry",
    "AdmissionPolicy",
    "DeletePolicy",
    "Drain",
    "DrainNode",
    "HedgingPolicy",
    "NotLeaderError",
    "Pin",
    "PolicyCommand",
    "PolicyError",
    "PolicyKind",
    "PolicySet",
    "PolicyStore",
    "PolicyStoreContext",
    "PolicyStoreFactory",
    "PolicyStoreStatus",
    "Role",
    "ScoringPolicy",
    "SetPolicy",
    "TenantQuota",
    "UndrainNode",
    "command_from_document",
    "command_to_document",
]

SCHEMA_VERSION = 1
"""Version of the policy document format; `from_document` refuses other versions."""

ANY = "*"
"""Model wildcard in scoring, admission and hedging policies."""

T = TypeVar("T")


class PolicyError(ValueError):
    """A policy or command is invalid; the message names the field (`pins['m'].min_replicas`)."""


class NotLeaderError(RuntimeError):
    """A write could not be committed: no leader is known or the cluster has no quorum."""


class Role(enum.Enum):
    """What a certificate identity may do through the Control API."""

    ADMIN = "admin"
    """Everything, including ACLs."""
    OPERATOR = "operator"
    """Read everything, drain and undrain nodes, pin and unpin models, load and unload models
    on a node's runtime; setting or deleting policies is for admins (the Control API's role
    table, `infermesh.agent.api.control.ALLOWED_RPCS`)."""
    VIEWER = "viewer"
    """Read only: policies, nodes, models and the event stream."""


# --------------------------------------------------------------------------- the policies


@attrs.frozen
class ScoringPolicy:
    """Scorer weights and filters for one model (or `*`) and, optionally, one SLO class."""

    model: str = ANY
    slo_class: SloClass | None = None
    """None: every SLO class."""
    weights: Mapping[str, float] = attrs.field(factory=dict)
    """Scorer name -> weight (>= 0; 0 disables the scorer); unnamed scorers keep their weight."""
    max_waiting: int | None = None
    """Filter: leave out replicas with more queued requests than this."""
    max_kv_cache_usage: float | None = None
    """Filter: leave out replicas whose KV cache is fuller than this fraction (0..1)."""

    def problems(self) -> list[tuple[str, str]]:
        found = [(f"weights[{k!r}]", _non_negative(v)) for k, v in self.weights.items()]
        found.append(("max_waiting", _optional_non_negative(self.max_waiting)))
        found.append(("max_kv_cache_usage", _optional_fraction(self.max_kv_cache_usage)))
        return _only(found)


@attrs.frozen
class AdmissionPolicy:
    """Admission limits for one model (or `*`) and, optionally, one SLO class."""

    model: str = ANY
    slo_class: SloClass | None = None
    max_concurrent: int | None = None
    """Requests in flight across the fleet before new ones are refused (None: no limit)."""
    max_queue: int | None = None
    """Requests waiting for admission before new ones are refused (None: no limit)."""
    shed_at_load: float | None = None
    """Fleet saturation (0..1] above which new requests are shed; None keeps the class default."""

    def problems(self) -> list[tuple[str, str]]:
        shed = self.shed_at_load
        return _only(
            [
                ("max_concurrent", _optional_positive_int(self.max_concurrent)),
                ("max_queue", _optional_non_negative(self.max_queue)),
                (
                    "shed_at_load",
                    "" if shed is None or 0 < shed <= 1 else f"must be in (0, 1], got {shed!r}",
                ),
            ]
        )


@attrs.frozen
class HedgingPolicy:
    """Whether and when a second copy of a slow request is sent to another replica."""

    model: str = ANY
    slo_class: SloClass | None = None
    enabled: bool = True
    delay_s: float = 0.5
    """Send the hedge when no first byte arrived after this long."""
    max_hedges: int = 1

    def problems(self) -> list[tuple[str, str]]:
        return _only(
            [
                ("delay_s", "" if self.delay_s > 0 else f"must be > 0, got {self.delay_s!r}"),
                (
                    "max_hedges",
                    "" if 0 <= self.max_hedges <= 4 else f"must be 0..4, got {self.max_hedges!r}",
                ),
            ]
        )


@attrs.frozen
class Pin:
    """A model served only from these nodes, with at least `min_replicas` of them loaded."""

    nodes: tuple[str, ...] = ()
    min_replicas: int = 0

    def problems(self) -> list[tuple[str, str]]:
        found = [("nodes", "must not be empty" if not self.nodes else "")]
        found += [(f"nodes[{i}]", "must not be empty") for i, n in enumerate(self.nodes) if not n]
        if len(set(self.nodes)) != len(self.nodes):
            found.append(("nodes", "names a node twice"))
        if self.min_replicas < 0:
            found.append(("min_replicas", f"must be >= 0, got {self.min_replicas}"))
        elif self.min_replicas > len(self.nodes):
            found.append(
                (
                    "min_replicas",
                    f"must be <= the {len(self.nodes)} pinned nodes, got {self.min_replicas}",
                )
            )
        return _only(found)


@attrs.frozen
class Drain:
    """A node that gets no new requests; its in-flight requests finish."""

    reason: str = ""
    since: float = 0.0
    """Unix time (s) when the drain was asked for, set by whoever submits the command."""

    def problems(self) -> list[tuple[str, str]]:
        return _only([("since", _non_negative(self.since))])


@attrs.frozen
class TenantQuota:
    """Per-tenant limits; None means unlimited."""

    requests_per_s: float | None = None
    concurrent: int | None = None
    tokens_per_s: float | None = None

    def problems(self) -> list[tuple[str, str]]:
        return _only(
            [
                ("requests_per_s", _optional_positive(self.requests_per_s)),
                ("concurrent", _optional_positive_int(self.concurrent)),
                ("tokens_per_s", _optional_positive(self.tokens_per_s)),
            ]
        )


@attrs.frozen
class AclEntry:
    """The role of one certificate identity (the SAN of its client certificate)."""

    role: Role = Role.VIEWER

    def problems(self) -> list[tuple[str, str]]:
        return []


class PolicyKind(enum.Enum):
    """The kinds of policy a `PolicySet` holds; the value is the document key."""

    SCORING = "scoring"
    ADMISSION = "admission"
    HEDGING = "hedging"
    PINS = "pins"
    DRAINS = "drains"
    QUOTAS = "quotas"
    ACLS = "acls"

    @classmethod
    def parse(cls, text: str) -> PolicyKind:
        try:
            return cls(text)
        except ValueError:
            allowed = ", ".join(k.value for k in cls)
            raise PolicyError(f"unknown policy kind {text!r}; expected one of: {allowed}") from None


_VALUE_TYPES: dict[PolicyKind, type[Any]] = {
    PolicyKind.SCORING: ScoringPolicy,
    PolicyKind.ADMISSION: AdmissionPolicy,
    PolicyKind.HEDGING: HedgingPolicy,
    PolicyKind.PINS: Pin,
    PolicyKind.DRAINS: Drain,
    PolicyKind.QUOTAS: TenantQuota,
    PolicyKind.ACLS: AclEntry,
}

PolicyValue = ScoringPolicy | AdmissionPolicy | HedgingPolicy | Pin | Drain | TenantQuota | AclEntry


# --------------------------------------------------------------------------- the commands


@attrs.frozen
class SetPolicy:
    """Create or replace the policy `name` of `kind` (a model, node, tenant or identity)."""

    kind: PolicyKind
    name: str
    value: PolicyValue


@attrs.frozen
class DeletePolicy:
    kind: PolicyKind
    name: str


@attrs.frozen
class DrainNode:
    node: str
    reason: str = ""
    since: float = 0.0


@attrs.frozen
class UndrainNode:
    node: str


PolicyCommand = SetPolicy | DeletePolicy | DrainNode | UndrainNode


def command_to_document(command: PolicyCommand) -> dict[str, Any]:
    """A JSON-friendly dict: what travels in the Raft log (never pickled objects)."""
    if isinstance(command, SetPolicy):
        return {
            "op": "set",
            "kind": command.kind.value,
            "name": command.name,
            "value": _unstructure(command.value),
        }
    if isinstance(command, DeletePolicy):
        return {"op": "delete", "kind": command.kind.value, "name": command.name}
    if isinstance(command, DrainNode):
        return {
            "op": "drain",
            "node": command.node,
            "reason": command.reason,
            "since": command.since,
        }
    return {"op": "undrain", "node": command.node}


def command_from_document(document: Mapping[str, Any]) -> PolicyCommand:
    """Read and validate a command written by `command_to_document` (or by a client)."""
    if not isinstance(document, Mapping):
        raise PolicyError(f"command: must be a table, got {type(document).__name__}")
    op = document.get("op")
    if op == "set":
        kind = PolicyKind.parse(_text(document, "kind"))
        name = _text(document, "name")
        path = f"{kind.value}[{name!r}]"
        value = _structure(_VALUE_TYPES[kind], document.get("value", {}), path)
        return SetPolicy(kind, name, value)
    if op == "delete":
        return DeletePolicy(PolicyKind.parse(_text(document, "kind")), _text(document, "name"))
    if op == "drain":
        drain = _structure(
            Drain,
            {k: v for k, v in document.items() if k in ("reason", "since")},
            "drain",
        )
        return DrainNode(_text(document, "node"), drain.reason, drain.since)
    if op == "undrain":
        return UndrainNode(_text(document, "node"))
    raise PolicyError(f"command.op: must be one of set, delete, drain, undrain, got {op!r}")


# --------------------------------------------------------------------------- the set


def _frozen_map(value: Mapping[str, T]) -> Mapping[str, T]:
    return types.MappingProxyType(dict(sorted(value.items())))


@attrs.frozen
class PolicySet:
    """Every policy in force, at one `revision` (incremented by each applied command)."""

    revision: int = 0
    scoring: Mapping[str, ScoringPolicy] = attrs.field(factory=dict, converter=_frozen_map)
    admission: Mapping[str, AdmissionPolicy] = attrs.field(factory=dict, converter=_frozen_map)
    hedging: Mapping[str, HedgingPolicy] = attrs.field(factory=dict, converter=_frozen_map)
    pins: Mapping[str, Pin] = attrs.field(factory=dict, converter=_frozen_map)
    drains: Mapping[str, Drain] = attrs.field(factory=dict, converter=_frozen_map)
    quotas: Mapping[str, TenantQuota] = attrs.field(factory=dict, converter=_frozen_map)
    acls: Mapping[str, AclEntry] = attrs.field(factory=dict, converter=_frozen_map)

    def of_kind(self, kind: PolicyKind) -> Mapping[str, PolicyValue]:
        found: Mapping[str, PolicyValue] = getattr(self, kind.value)
        return found

    def apply(self, command: PolicyCommand) -> PolicySet:
        """The next set after `command`, at revision + 1; raises PolicyError naming the field."""
        if isinstance(command, DrainNode):
            command = SetPolicy(
                PolicyKind.DRAINS, command.node, Drain(command.reason, command.since)
            )
        elif isinstance(command, UndrainNode):
            if command.node not in self.drains:
                raise PolicyError(f"drains[{command.node!r}]: node is not drained")
            command = DeletePolicy(PolicyKind.DRAINS, command.node)
        kind = command.kind
        entries = dict(self.of_kind(kind))
        path = f"{kind.value}[{command.name!r}]"
        if not command.name:
            raise PolicyError(f"{kind.value}: a policy name must not be empty")
        if isinstance(command, SetPolicy):
            expected = _VALUE_TYPES[kind]
            if not isinstance(command.value, expected):
                raise PolicyError(
                    f"{path}: must be a {expected.__name__}, got {type(command.value).__name__}"
                )
            _raise_problems(path, command.value.problems())
            entries[command.name] = command.value
        else:
            if command.name not in entries:
                raise PolicyError(f"{path}: no such policy")
            del entries[command.name]
        changes: dict[str, Any] = {kind.value: entries, "revision": self.revision + 1}
        return attrs.evolve(self, **changes)

    def scoring_for(self, model: str, slo_class: SloClass) -> ScoringPolicy | None:
        """The most specific scoring policy for a request (model+class, model, *+class, *)."""
        return _most_specific(self.scoring.values(), model, slo_class)

    def admission_for(self, model: str, slo_class: SloClass) -> AdmissionPolicy | None:
        return _most_specific(self.admission.values(), model, slo_class)

    def hedging_for(self, model: str, slo_class: SloClass) -> HedgingPolicy | None:
        return _most_specific(self.hedging.values(), model, slo_class)

    def to_document(self) -> dict[str, Any]:
        """A JSON/TOML-friendly dict (no None values, enums as strings) that round-trips."""
        document: dict[str, Any] = {"version": SCHEMA_VERSION, "revision": self.revision}
        for kind in PolicyKind:
            entries = self.of_kind(kind)
            if entries:
                document[kind.value] = {name: _unstructure(v) for name, v in entries.items()}
        return document

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> PolicySet:
        """Read a policy document (from `infermesh policy set FILE` or a snapshot); validate all."""
        if not isinstance(document, Mapping):
            raise PolicyError(f"policy document: must be a table, got {type(document).__name__}")
        version = document.get("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise PolicyError(
                f"version: this InferMesh reads version {SCHEMA_VERSION}, got {version!r}"
            )
        known = {"version", "revision"} | {k.value for k in PolicyKind}
        unknown = sorted(set(document) - known)
        if unknown:
            raise PolicyError(
                f"{unknown[0]}: unknown key; expected one of: {', '.join(sorted(known))}"
            )
        revision = document.get("revision", 0)
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise PolicyError(f"revision: must be an integer >= 0, got {revision!r}")
        fields: dict[str, Any] = {"revision": revision}
        for kind in PolicyKind:
            table = document.get(kind.value, {})
            if not isinstance(table, Mapping):
                raise PolicyError(f"{kind.value}: must be a table, got {type(table).__name__}")
            entries: dict[str, Any] = {}
            for name, raw in table.items():
                path = f"{kind.value}[{name!r}]"
                if not isinstance(name, str) or not name:
                    raise PolicyError(f"{path}: a policy name must be a non-empty string")
                value = _structure(_VALUE_TYPES[kind], raw, path)
                _raise_problems(path, value.problems())
                entries[name] = value
            fields[kind.value] = entries
        return cls(**fields)


_Scoped = TypeVar("_Scoped", ScoringPolicy, AdmissionPolicy, HedgingPolicy)


def _most_specific(
    candidates: typing.Iterable[_Scoped], model: str, slo_class: SloClass
) -> _Scoped | None:
    best: tuple[int, _Scoped] | None = None
    for policy in candidates:
        if policy.model not in (model, ANY) or policy.slo_class not in (slo_class, None):
            continue
        rank = (2 if policy.model == model else 0) + (1 if policy.slo_class is not None else 0)
        if best is None or rank > best[0]:
            best = (rank, policy)
    return None if best is None else best[1]


# --------------------------------------------------------------------------- the store protocol


@attrs.frozen
class PolicyStoreStatus:
    """What `infermesh nodes`/`status` shows about the policy store of one agent."""

    role: str
    """`leader`, `follower`, `candidate` or `single` (a one-node store)."""
    leader: str | None
    """Address of the current leader, when known."""
    voters: tuple[str, ...]
    revision: int
    """Revision of the policy this node has applied."""


@runtime_checkable
class PolicyStore(Protocol):
    """Where the policy lives: linearizable writes, local reads, change notifications.

    The factory builds the store without I/O; `start()` opens files, sockets and threads.
    """

    async def start(self) -> None:
        """Load persisted state and join the cluster; returns without waiting for a leader."""
        ...

    async def get(self) -> PolicySet:
        """The policy this node has applied (may trail the leader by a heartbeat)."""
        ...

    async def submit(self, command: PolicyCommand) -> PolicySet:
        """Commit `command` through the leader; the set it produced once applied here.

        Raises PolicyError (invalid command) or NotLeaderError (no leader / no quorum in time).
        """
        ...

    def watch(self) -> AsyncIterator[PolicySet]:
        """The current set, then every newer one (intermediate revisions may be skipped)."""
        ...

    async def status(self) -> PolicyStoreStatus: ...

    async def aclose(self) -> None: ...


@attrs.frozen
class PolicyStoreContext:
    """What a policy-store factory receives from the agent."""

    node: str
    """This agent's node name."""
    data_dir: str
    """Directory the store owns (created by the agent) for its log, snapshots or document."""
    options: Mapping[str, Any] = attrs.field(factory=dict)
    """The store's own settings (for `raft`: the `[raft]` config table)."""


PolicyStoreFactory = Callable[[PolicyStoreContext], PolicyStore]


# --------------------------------------------------------------------------- structuring helpers


def _only(found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(field, problem) for field, problem in found if problem]


def _raise_problems(path: str, problems: list[tuple[str, str]]) -> None:
    if problems:
        raise PolicyError("; ".join(f"{path}.{field}: {problem}" for field, problem in problems))


def _non_negative(value: float) -> str:
    return "" if value >= 0 else f"must be >= 0, got {value!r}"


def _optional_non_negative(value: float | None) -> str:
    return "" if value is None else _non_negative(value)


def _optional_positive(value: float | None) -> str:
    return "" if value is None or value > 0 else f"must be > 0, got {value!r}"


def _optional_positive_int(value: int | None) -> str:
    return "" if value is None or value >= 1 else f"must be >= 1, got {value!r}"


def _optional_fraction(value: float | None) -> str:
    return "" if value is None or 0 <= value <= 1 else f"must be in [0, 1], got {value!r}"


def _text(document: Mapping[str, Any], key: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value:
        raise PolicyError(f"command.{key}: must be a non-empty string, got {value!r}")
    return value


def _unstructure(value: Any) -> Any:
    if attrs.has(type(value)):
        out = {}
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if item is not None:
                out[field.name] = _unstructure(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {k: _unstructure(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_unstructure(v) for v in value]
    return value


def _structure(cls: type[T], raw: Any, path: str) -> T:
    """Build `cls` (an attrs class above) from a dict, naming the field of any wrong value."""
    if not isinstance(raw, Mapping):
        raise PolicyError(f"{path}: must be a table, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [field.name for field in attrs.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise PolicyError(f"{path}.{unknown[0]}: unknown key; expected one of: {', '.join(names)}")
    values = {
        name: _convert(hints[name], raw[name], f"{path}.{name}") for name in names if name in raw
    }
    return cls(**values)


def _convert(hint: Any, raw: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, raw, path)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(raw)
        except ValueError:
            allowed = ", ".join(str(m.value) for m in hint)
            raise PolicyError(f"{path}: must be one of {allowed}, got {raw!r}") from None
    if origin is tuple:
        if not isinstance(raw, list | tuple):
            raise PolicyError(f"{path}: must be a list, got {type(raw).__name__}")
        return tuple(_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(raw))
    if origin is Mapping or origin is dict:
        if not isinstance(raw, Mapping):
            raise PolicyError(f"{path}: must be a table, got {type(raw).__name__}")
        return {
            _convert(str, key, path): _convert(args[1], item, f"{path}[{key!r}]")
            for key, item in raw.items()
        }
    if hint is bool:
        if not isinstance(raw, bool):
            raise PolicyError(f"{path}: must be true or false, got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise PolicyError(f"{path}: must be an integer, got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            raise PolicyError(f"{path}: must be a finite number, got {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise PolicyError(f"{path}: must be a string, got {raw!r}")
        return raw
    raise TypeError(f"policy field type {hint!r} is not supported")  # pragma: no cover

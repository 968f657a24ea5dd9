"""The InferMesh data model: what a runtime, a GPU and a request look like to the mesh.

Values only: frozen attrs classes in normalised units (seconds, bytes, watts, fractions 0..1).
Nothing here does I/O or reads a clock; callers pass `now` in.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import attrs

__all__ = [
    "GpuKey",
    "GpuState",
    "GpuStateDelta",
    "Labels",
    "ModelState",
    "ModelStateDelta",
    "RequestFeatures",
    "SloClass",
    "TargetKey",
    "finite_or_none",
]


class SloClass(enum.Enum):
    """Service-level class of a request, chosen by the `x-infermesh-slo` header.

    Each class carries how the router treats it: its admission priority (lower is served first),
    whether it may be hedged, and the share of a replica's capacity it may use before it is shed.
    """

    LATENCY = "latency"
    STANDARD = "standard"
    BATCH = "batch"

    @property
    def priority(self) -> int:
        return {SloClass.LATENCY: 0, SloClass.STANDARD: 1, SloClass.BATCH: 2}[self]

    @property
    def hedgeable(self) -> bool:
        return self is SloClass.LATENCY

    @property
    def shed_at_load(self) -> float:
        """Fraction of fleet saturation above which new requests of this class are shed."""
        return {SloClass.LATENCY: 1.0, SloClass.STANDARD: 0.95, SloClass.BATCH: 0.8}[self]

    @classmethod
    def parse(cls, text: str | None) -> SloClass:
        """Read a header value; absent or empty means STANDARD. Unknown values raise ValueError."""
        if not text or not text.strip():
            return cls.STANDARD
        try:
            return cls(text.strip().lower())
        except ValueError:
            allowed = ", ".join(c.value for c in cls)
            raise ValueError(f"unknown SLO class {text!r}; expected one of: {allowed}") from None


def _freeze_custom(
    value: Mapping[str, str] | tuple[tuple[str, str], ...],
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@attrs.frozen
class Labels:
    """Descriptive labels of a target or GPU; used for filtering and for metric labels."""

    model: str = ""
    revision: str = ""
    runtime: str = ""
    node: str = ""
    gpu_uuid: str = ""
    mig_profile: str = ""
    quant: str = ""
    tenant: str = ""
    zone: str = ""
    custom: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_freeze_custom)

    def get(self, name: str) -> str | None:
        """A label by name: a standard field first, then the custom ones."""
        if name != "custom" and name in attrs.fields_dict(Labels):
            value = getattr(self, name)
            return str(value)
        return dict(self.custom).get(name)

    def matches(self, filters: Mapping[str, str]) -> bool:
        """True when every filter `name=value` equals this label set's value for `name`."""
        return all(self.get(name) == value for name, value in filters.items())


@attrs.frozen(order=True)
class TargetKey:
    """Identity of one routable target: a model served by one runtime endpoint on one node.

    `endpoint` is the runtime's base URL (e.g. `http://10.0.0.7:8000`); several vLLM engines
    behind one API server are one target.
    """

    model: str
    node: str
    endpoint: str

    @functools.cached_property
    def target_id(self) -> str:
        """`node|endpoint|model`: formatted on the first read, then kept (keys are frozen)."""
        return f"{self.node}|{self.endpoint}|{self.model}"

    @classmethod
    def parse(cls, target_id: str) -> TargetKey:
        parts = target_id.split("|")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"malformed target id {target_id!r}; expected 'node|endpoint|model'")
        return cls(node=parts[0], endpoint=parts[1], model=parts[2])


@attrs.frozen(order=True)
class GpuKey:
    """Identity of one GPU or MIG instance on a node."""

    node: str
    gpu_uuid: str

    @property
    def label(self) -> str:
        return f"{self.node}/{self.gpu_uuid}"


# Fallback service time when a runtime has not yet reported any latency histogram.
DEFAULT_REQUEST_SERVICE_S = 1.0


@attrs.frozen
class ModelState:
    """What one runtime reports about one model it serves, in normalised units.

    `version` increases with every change from the source; `last_updated` is the source clock
    (Unix seconds) at which the values were read.
    """

    key: TargetKey
    labels: Labels = Labels()
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float | None = None
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    max_num_seqs: int | None = None
    loaded: bool = True
    warming: bool = False
    healthy: bool = True
    health_reason: str = ""
    adapters: tuple[str, ...] = ()
    last_updated: float = 0.0
    version: int = 0

    @property
    def request_service_s(self) -> float:
        """Seconds one request takes end to end: `e2e_s`, or a default before any is reported."""
        if self.e2e_s is not None and self.e2e_s > 0:
            return self.e2e_s
        return DEFAULT_REQUEST_SERVICE_S

    @property
    def work_left_s(self) -> float:
        """Expected seconds to drain what is queued and running at the current parallelism.

        Running requests are on average half done; queued ones need a full service time each,
        and the engine works on max(running, 1) of them at once.
        """
        return self.work_left_with_s(extra_queued=0)

    def work_left_with_s(self, extra_queued: float) -> float:
        """`work_left_s` as if `extra_queued` more requests were waiting (e.g. unseen in-flight)."""
        outstanding = self.waiting + extra_queued + 0.5 * self.running
        return outstanding * self.request_service_s / max(self.running, 1.0)

    def is_fresh(self, now: float, stale_after_s: float) -> bool:
        return now - self.last_updated <= stale_after_s

    def apply(self, delta: ModelStateDelta) -> ModelState:
        """This state with `delta` applied; a delta not newer than this state changes nothing."""
        if delta.key != self.key:
            raise ValueError(f"delta for {delta.key.target_id} applied to {self.key.target_id}")
        if delta.version <= self.version:
            return self
        return attrs.evolve(self, version=delta.version, **delta.changes)

    def delta_to(self, new: ModelState) -> ModelStateDelta:
        """The delta that turns this state into `new` (only the changed fields).

        `new` must be the same target and, if anything changed, carry a newer version: a delta
        that is not newer would be dropped by `apply`.
        """
        if new.key != self.key:
            raise ValueError(f"delta from {self.key.target_id} to {new.key.target_id}")
        return ModelStateDelta(
            key=new.key, version=new.version, changes=_changed(self, new, self.key.target_id)
        )

    @classmethod
    def from_delta(cls, delta: ModelStateDelta) -> ModelState:
        """A state built from defaults plus `delta`, whatever its version (even 0)."""
        return attrs.evolve(cls(key=delta.key), version=delta.version, **delta.changes)


def _check_changes(cls: type[Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    fixed = {"key", "version"} & set(changes)
    if fixed:
        raise ValueError(f"a delta cannot change {sorted(fixed)}: they identify the state")
    unknown = set(changes) - set(attrs.fields_dict(cls))
    if unknown:
        allowed = ", ".join(sorted(set(attrs.fields_dict(cls)) - {"key", "version"}))
        raise ValueError(
            f"unknown {cls.__name__} field(s) in delta: {sorted(unknown)}; known fields: {allowed}"
        )
    return dict(changes)


_S = TypeVar("_S", "ModelState", "GpuState")


def _changed(old: _S, new: _S, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in attrs.fields(type(new)):
        if field.name in ("key", "version"):
            continue
        value = getattr(new, field.name)
        if getattr(old, field.name) != value:
            out[field.name] = value
    if out and new.version <= old.version:
        raise ValueError(
            f"{what}: changed state must carry a newer version than {old.version}, "
            f"got {new.version} (the delta would be dropped as stale)"
        )
    return out


@attrs.frozen
class ModelStateDelta:
    """A change to one target's ModelState: only the changed fields, with the source's version."""

    key: TargetKey
    version: int
    # Excluded from the hash (a dict is unhashable); equality still compares it.
    changes: Mapping[str, Any] = attrs.field(factory=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "changes", _check_changes(ModelState, self.changes))


# Clock-event (throttle) reasons that mean the GPU is slowed by something other than idling
# or an application clock setting; names follow NVML's nvmlClocksEventReason* constants.
# A throttled GPU still computes correctly: scoring sends it less work (infermesh.core.scoring.
# gpu_health) rather than excluding it.
SEVERE_CLOCK_EVENTS = frozenset({"hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"})
THROTTLE_CLOCK_EVENTS = SEVERE_CLOCK_EVENTS | {"sw_thermal_slowdown", "sw_power_cap"}

# XIDs that NVIDIA attributes to the application (graphics engine exception, MMU fault, stopped
# processing, preemptive cleanup): one bad client kernel must not take the GPU out of rotation.
APPLICATION_XIDS = frozenset({13, 31, 43, 45})


@attrs.frozen
class GpuState:
    """Telemetry of one GPU or MIG instance, in normalised units."""

    key: GpuKey
    labels: Labels = Labels()
    index: int = 0
    name: str = ""
    mig_profile: str = ""
    utilization: float = 0.0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    temperature_c: float = 0.0
    power_w: float = 0.0
    power_limit_w: float = 0.0
    clock_event_reasons: frozenset[str] = frozenset()
    ecc_dbe_volatile: int = 0
    xid_last: int = 0
    remapped_rows_pending: bool = False
    remapped_rows_failure: bool = False
    last_updated: float = 0.0
    version: int = 0

    @property
    def vram_headroom(self) -> float:
        """Fraction of device memory still free, 0..1 (0 when the total is unknown)."""
        if self.memory_total_bytes <= 0:
            return 0.0
        free = self.memory_total_bytes - self.memory_used_bytes
        return min(1.0, max(0.0, free / self.memory_total_bytes))

    @property
    def health(self) -> tuple[bool, str]:
        """(healthy, reason): False on a fault that makes results or the device unreliable —
        uncorrectable ECC, row remapping, or an XID not caused by the application (XID 79: the
        GPU fell off the bus). Throttling is not a fault: it is in `throttle_reasons`.

        The first problem found is the reason; a healthy GPU's reason is "ok".
        """
        if self.ecc_dbe_volatile > 0:
            return False, f"{self.ecc_dbe_volatile} uncorrectable (double-bit) ECC errors"
        if self.remapped_rows_failure:
            return False, "row remapping failed"
        if self.remapped_rows_pending:
            return False, "row remapping pending (GPU reset required)"
        if self.xid_last and self.xid_last not in APPLICATION_XIDS:
            return False, f"XID {self.xid_last} reported"
        return True, "ok"

    @property
    def throttle_reasons(self) -> tuple[str, ...]:
        """The active clock events that slow this GPU down (thermal or power), sorted."""
        return tuple(sorted(self.clock_event_reasons & THROTTLE_CLOCK_EVENTS))

    @property
    def healthy(self) -> bool:
        return self.health[0]

    def apply(self, delta: GpuStateDelta) -> GpuState:
        """This state with `delta` applied; a delta not newer than this state changes nothing."""
        if delta.key != self.key:
            raise ValueError(f"delta for {delta.key.label} applied to {self.key.label}")
        if delta.version <= self.version:
            return self
        return attrs.evolve(self, version=delta.version, **delta.changes)

    def delta_to(self, new: GpuState) -> GpuStateDelta:
        """The delta that turns this state into `new` (same GPU, newer version if changed)."""
        if new.key != self.key:
            raise ValueError(f"delta from {self.key.label} to {new.key.label}")
        return GpuStateDelta(
            key=new.key, version=new.version, changes=_changed(self, new, self.key.label)
        )

    @classmethod
    def from_delta(cls, delta: GpuStateDelta) -> GpuState:
        """A state built from defaults plus `delta`, whatever its version (even 0)."""
        return attrs.evolve(cls(key=delta.key), version=delta.version, **delta.changes)


@attrs.frozen
class GpuStateDelta:
    """A change to one GPU's GpuState: only the changed fields, with the source's version."""

    key: GpuKey
    version: int
    changes: Mapping[str, Any] = attrs.field(factory=dict, hash=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "changes", _check_changes(GpuState, self.changes))


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen
class RequestFeatures:
    """What the router knows about a request before choosing a target."""

    model: str
    slo_class: SloClass = SloClass.STANDARD
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    prefix_key: int = 0
    """Hash of the leading prompt blocks; 0 means no prefix information."""
    tenant: str = ""
    stream: bool = False
    filters: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_freeze_custom)
    request_id: str = ""
    prefix_keys: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)
    """Hashes of the prompt's first 64, 128, 256, ... tokens, shallowest first
    (infermesh.core.scoring.prefix.PREFIX_DEPTHS); empty when the router sent only
    `prefix_key`."""


def finite_or_none(value: float | None) -> float | None:
    """None for None, NaN and infinities: the values a scrape can produce but a score can't use."""
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value

"""What one source says about one GPU or MIG instance, and the GpuState made of it (sans-I/O).

Shared by the dcgm-exporter and NVML adapters so both key, label and fill GpuStates the same
way: a GPU is keyed by its UUID, a MIG instance by `<GPU UUID>/gi<GPU instance id>`, and a field
the source did not give keeps GpuState's default. `memory_used_bytes` includes the framebuffer
the driver reserves, so `vram_headroom` is what a workload can still allocate.
"""

from __future__ import annotations

from typing import TypeVar

import attrs

from infermesh.core.model import GpuKey, GpuState, Labels

__all__ = ["DeviceReading", "device_state", "inherit", "mig_key"]

_T = TypeVar("_T")

# Fields a MIG instance takes from its GPU when it has no series of its own.
_DEVICE_WIDE = (
    "utilization",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "clock_event_reasons",
    "xid_last",
    "ecc_dbe_volatile",
    "ecc_sbe_volatile",
    "remapped_rows_pending",
    "remapped_rows_failure",
)


def mig_key(gpu_uuid: str, gpu_instance_id: int | str) -> str:
    """The `gpu_uuid` of a MIG instance in GpuKey: `<GPU UUID>/gi<GPU instance id>`."""
    return f"{gpu_uuid}/gi{gpu_instance_id}"


@attrs.define
class DeviceReading:
    """What one source says about one GPU or MIG instance; None means "not given".

    `problems` says, per field the source could not give, why (NVML: "not supported", "no
    permission", ...); the dcgm-exporter page has no such reasons (a series is there or not).
    """

    uuid: str
    index: int = 0
    model_name: str = ""
    hostname: str = ""
    pci_bus_id: str = ""
    mig_profile: str = ""
    gpu_instance_id: str = ""
    mig_uuid: str = ""
    """NVML's own UUID of a MIG instance (`MIG-...`), where the source knows it."""
    mig_mode: bool | None = None
    utilization: float | None = None
    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_reserved_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    clock_event_reasons: frozenset[str] | None = None
    xid_last: int | None = None
    ecc_dbe_volatile: int | None = None
    ecc_sbe_volatile: int | None = None
    """Correctable ECC errors: read and shown by `nvml_check`, not part of GpuState."""
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None
    problems: dict[str, str] = attrs.field(factory=dict)

    @property
    def key_uuid(self) -> str:
        return mig_key(self.uuid, self.gpu_instance_id) if self.gpu_instance_id else self.uuid

    @property
    def memory_taken_bytes(self) -> int | None:
        """used + reserved: what no workload can allocate (NVML v1's `used` counts both)."""
        if self.memory_used_bytes is None:
            return None
        return self.memory_used_bytes + (self.memory_reserved_bytes or 0)

    @property
    def memory_total_bytes(self) -> int | None:
        """used + free + reserved (reserved counts 0 when the exporter predates the field)."""
        if self.memory_used_bytes is None or self.memory_free_bytes is None:
            return None
        return self.memory_used_bytes + self.memory_free_bytes + (self.memory_reserved_bytes or 0)


def inherit(instance: DeviceReading, parent: DeviceReading | None) -> DeviceReading:
    if parent is None:
        return instance
    missing = {
        name: getattr(parent, name)
        for name in _DEVICE_WIDE
        if getattr(instance, name) is None and getattr(parent, name) is not None
    }
    return attrs.evolve(instance, **missing) if missing else instance


def device_state(device: DeviceReading, node: str, now: float) -> GpuState:
    """The GpuState of one reading; absent series keep GpuState's defaults."""
    key = GpuKey(node=node, gpu_uuid=device.key_uuid)
    custom = {"gpu_model": device.model_name, "hostname": device.hostname}
    custom["pci_bus_id"] = device.pci_bus_id
    if device.gpu_instance_id:
        custom["parent_gpu_uuid"] = device.uuid
        custom["gpu_instance_id"] = device.gpu_instance_id
        custom["mig_uuid"] = device.mig_uuid
    defaults = GpuState(key=key)
    return GpuState(
        key=key,
        labels=Labels(
            node=node,
            gpu_uuid=key.gpu_uuid,
            mig_profile=device.mig_profile,
            custom={name: value for name, value in custom.items() if value},
        ),
        index=device.index,
        name=device.model_name,
        mig_profile=device.mig_profile,
        utilization=_or(device.utilization, defaults.utilization),
        memory_used_bytes=_or(device.memory_taken_bytes, defaults.memory_used_bytes),
        memory_total_bytes=_or(device.memory_total_bytes, defaults.memory_total_bytes),
        temperature_c=_or(device.temperature_c, defaults.temperature_c),
        power_w=_or(device.power_w, defaults.power_w),
        power_limit_w=_or(device.power_limit_w, defaults.power_limit_w),
        clock_event_reasons=_or(device.clock_event_reasons, defaults.clock_event_reasons),
        ecc_dbe_volatile=_or(device.ecc_dbe_volatile, defaults.ecc_dbe_volatile),
        xid_last=_or(device.xid_last, defaults.xid_last),
        remapped_rows_pending=_or(device.remapped_rows_pending, defaults.remapped_rows_pending),
        remapped_rows_failure=_or(device.remapped_rows_failure, defaults.remapped_rows_failure),
        last_updated=now,
    )


def _or(value: _T | None, default: _T) -> _T:
    return default if value is None else value

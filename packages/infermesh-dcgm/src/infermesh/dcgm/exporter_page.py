"""Read a dcgm-exporter /metrics page into per-GPU and per-MIG-instance GpuStates (sans-I/O).

Only the DCGM fields InferMesh uses are parsed (one prefix test drops every other line). Units
are normalised: utilisation % -> 0..1, framebuffer MiB -> bytes, power W, temperature °C.
A series the exporter does not write (not in its collectors CSV, unsupported by the GPU, or a
DCGM blank value) leaves that field at GpuState's default; it is never an error.

MIG: a series with `GPU_I_ID` belongs to one GPU instance, keyed `<GPU UUID>/gi<GPU_I_ID>`
(the same key the NVML adapter uses). Fields an instance has no series of (temperature, power,
clock events, XID, ECC, row remapping: device-wide in DCGM) come from its GPU's series, so a
hot or failing GPU shows on every instance carved out of it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from infermesh.core.model import GpuKey, GpuState
from infermesh.core.prometheus import MetricsParseError, Sample, parse_samples
from infermesh.dcgm.clock_events import reasons_from_bitmask
from infermesh.dcgm.reading import DeviceReading, device_state, inherit, mig_key

__all__ = ["ExporterPageError", "ExporterReading", "gpu_states", "read_exporter_page"]

MIB = 1024 * 1024
# DCGM's blank/not-found/not-supported sentinels are just below 2**63; older exporters printed
# them (e.g. DCGM_FI_DEV_MEMORY_TEMP 9223372036854775794). Anything this large means "no value".
BLANK_THRESHOLD = 9.2e18

UTIL = "DCGM_FI_DEV_GPU_UTIL"
GR_ACTIVE = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
TEMP = "DCGM_FI_DEV_GPU_TEMP"
POWER = "DCGM_FI_DEV_POWER_USAGE"
POWER_LIMIT = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
ENFORCED_LIMIT = "DCGM_FI_DEV_ENFORCED_POWER_LIMIT"
CLOCK_EVENTS = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
THROTTLE = "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS"
XID = "DCGM_FI_DEV_XID_ERRORS"
ECC_DBE = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
ECC_SBE = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
REMAP_PENDING = "DCGM_FI_DEV_ROW_REMAP_PENDING"
REMAP_FAILURE = "DCGM_FI_DEV_ROW_REMAP_FAILURE"

FAMILIES = (
    UTIL,
    GR_ACTIVE,
    FB_USED,
    FB_FREE,
    FB_RESERVED,
    TEMP,
    POWER,
    POWER_LIMIT,
    ENFORCED_LIMIT,
    CLOCK_EVENTS,
    THROTTLE,
    XID,
    ECC_DBE,
    ECC_SBE,
    REMAP_PENDING,
    REMAP_FAILURE,
)


class ExporterPageError(ValueError):
    """The page is not a dcgm-exporter exposition InferMesh can read; says why."""


@attrs.frozen
class ExporterReading:
    """The GPUs (and MIG instances) of one page, by their GpuKey `gpu_uuid`."""

    devices: Mapping[str, DeviceReading]


def _value(sample: Sample) -> float | None:
    value = sample.value
    if math.isnan(value) or math.isinf(value) or abs(value) >= BLANK_THRESHOLD:
        return None
    return value


def _device(devices: dict[str, DeviceReading], sample: Sample) -> DeviceReading:
    labels = sample.labels
    uuid = labels.get("UUID") or labels.get("uuid")  # `uuid` with --use-old-namespace
    if not uuid:
        raise ExporterPageError(
            f"a {sample.name} series has no UUID label (labels: {dict(labels)}); "
            "is this a dcgm-exporter page?"
        )
    instance = labels.get("GPU_I_ID", "")
    key = mig_key(uuid, instance) if instance else uuid
    device = devices.get(key)
    if device is None:
        gpu = labels.get("gpu", "")
        device = DeviceReading(
            uuid=uuid,
            index=int(gpu) if gpu.isdigit() else 0,
            model_name=labels.get("modelName") or labels.get("model_name", ""),
            hostname=labels.get("Hostname") or labels.get("hostname", ""),
            pci_bus_id=labels.get("pci_bus_id", ""),
            mig_profile=labels.get("GPU_I_PROFILE", "") if instance else "",
            gpu_instance_id=instance,
        )
        devices[key] = device
    return device


def read_exporter_page(text: str) -> ExporterReading:
    """The GPUs on a dcgm-exporter page. Raises ExporterPageError for a page it cannot read."""
    try:
        found = parse_samples(text, FAMILIES)
    except MetricsParseError as exc:
        raise ExporterPageError(f"malformed exposition: {exc}") from None
    devices: dict[str, DeviceReading] = {}
    for family in FAMILIES:
        for sample in found[family]:
            device = _device(devices, sample)
            value = _value(sample)
            if value is not None:
                _assign(device, family, value)
    if not devices and text.strip() and "DCGM_FI_" not in text:
        raise ExporterPageError(
            "no DCGM_FI_* series on the page; is the URL dcgm-exporter's /metrics?"
        )
    return ExporterReading(devices=devices)


def _assign(device: DeviceReading, family: str, value: float) -> None:
    if family == UTIL:
        device.utilization = min(1.0, max(0.0, value / 100.0))
    elif family == GR_ACTIVE:
        if device.utilization is None:  # DCGM_FI_DEV_GPU_UTIL wins where both are present
            device.utilization = min(1.0, max(0.0, value))
    elif family == FB_USED:
        device.memory_used_bytes = max(0, int(value * MIB))
    elif family == FB_FREE:
        device.memory_free_bytes = max(0, int(value * MIB))
    elif family == FB_RESERVED:
        device.memory_reserved_bytes = max(0, int(value * MIB))
    elif family == TEMP:
        device.temperature_c = value
    elif family == POWER:
        device.power_w = max(0.0, value)
    elif family == POWER_LIMIT or (family == ENFORCED_LIMIT and device.power_limit_w is None):
        device.power_limit_w = max(0.0, value)
    elif family == CLOCK_EVENTS or (family == THROTTLE and device.clock_event_reasons is None):
        device.clock_event_reasons = reasons_from_bitmask(max(0, int(value)))
    elif family == XID:
        device.xid_last = max(0, int(value))
    elif family == ECC_DBE:
        device.ecc_dbe_volatile = max(0, int(value))
    elif family == ECC_SBE:
        device.ecc_sbe_volatile = max(0, int(value))
    elif family == REMAP_PENDING:
        device.remapped_rows_pending = value > 0
    elif family == REMAP_FAILURE:
        device.remapped_rows_failure = value > 0


def gpu_states(reading: ExporterReading, node: str, now: float) -> dict[GpuKey, GpuState]:
    """One GpuState per GPU and per MIG instance on the page, keyed by GpuKey."""
    states = {}
    for device in reading.devices.values():
        if device.gpu_instance_id:
            device = inherit(device, reading.devices.get(device.uuid))
        state = device_state(device, node, now)
        states[state.key] = state
    return states

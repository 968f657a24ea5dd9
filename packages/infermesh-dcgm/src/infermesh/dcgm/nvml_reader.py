"""Read this node's GPUs through NVML (synchronous; the adapter runs it in a worker thread).

The NVML module is injected (`pynvml` from nvidia-ml-py in production, a fake in tests), so
nothing here loads a driver at import time. Every field is read on its own: an `NVMLError_*`
for one field (NotSupported is normal: consumer GPUs have no ECC, MIG GPUs no utilisation)
leaves that field out and records why in `DeviceReading.problems`; only a lost GPU drops the
whole device from the reading. XIDs come from an NVML event set (XID critical errors) drained
without waiting on every read; the last XID of a GPU stays reported, like dcgm-exporter's
`DCGM_FI_DEV_XID_ERRORS` gauge. `running_processes` lists the processes on each GPU and MIG
instance, for replica discovery (`nvml_processes`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from infermesh.core.logging import get_logger
from infermesh.dcgm.clock_events import reasons_from_bitmask
from infermesh.dcgm.nvml_processes import NvmlProcesses, list_processes
from infermesh.dcgm.reading import DeviceReading, inherit

__all__ = ["NvmlProcesses", "NvmlReader", "NvmlReading", "NvmlUnavailableError"]

log = get_logger("infermesh.dcgm.nvml")

_T = TypeVar("_T")
MAX_EVENTS_PER_READ = 64


class NvmlUnavailableError(RuntimeError):
    """NVML cannot be used on this machine (no driver, no library, no permission); says why."""


class GpuLostError(RuntimeError):
    """NVML reports the GPU as lost (fallen off the bus) or needing a reset."""


@attrs.frozen
class NvmlReading:
    """Every GPU (and MIG instance) NVML showed, plus what could not be read at all."""

    driver_version: str
    devices: tuple[DeviceReading, ...]
    lost: tuple[str, ...] = ()
    """`index N (UUID)` of GPUs NVML reports as lost or needing a reset."""


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads the GPUs through the NVML module `nvml`; `start()` first, `close()` at the end."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self._started = False
        self._event_set: Any = None
        self._xid: dict[str, int] = {}
        self._uuid_of_index: dict[int, str] = {}
        self._lock = threading.Lock()  # one NVML conversation at a time (reads, process lists)
        self.xid_problem = ""
        """Why XIDs cannot be watched ("" when they can)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """nvmlInit; NvmlUnavailableError saying why when there is no usable NVML."""
        nvml = self.nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise NvmlUnavailableError(self._why_unavailable(exc)) from None
        except OSError as exc:  # a broken libnvidia-ml.so raises from ctypes
            raise NvmlUnavailableError(f"cannot load the NVML library: {exc}") from None
        self._started = True
        self._watch_xids()

    def _why_unavailable(self, exc: Exception) -> str:
        nvml = self.nvml
        if isinstance(exc, nvml.NVMLError_LibraryNotFound):
            return "the NVML library (libnvidia-ml.so.1) is not installed: no NVIDIA driver here"
        if isinstance(exc, nvml.NVMLError_DriverNotLoaded):
            return "the NVIDIA kernel driver is not loaded"
        if isinstance(exc, nvml.NVMLError_NoPermission):
            return "no permission to use NVML (run as a user allowed to open /dev/nvidia*)"
        if isinstance(exc, nvml.NVMLError_LibRmVersionMismatch):
            return "the NVML library and the kernel driver versions differ (reboot or reinstall)"
        return f"nvmlInit failed: {exc}"

    def close(self) -> None:
        """Free the event set and nvmlShutdown, after a read or process list in flight (from a
        cancelled caller) ends; errors are logged, never raised."""
        with self._lock:
            if not self._started:
                return
            nvml = self.nvml
            self._started = False
            try:
                if self._event_set is not None:
                    nvml.nvmlEventSetFree(self._event_set)
                    self._event_set = None
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                log.warning("nvmlShutdown failed", error=str(exc))

    # ------------------------------------------------------------------ one read

    def read(self) -> NvmlReading:
        """Every GPU and MIG instance now. Raises NvmlUnavailableError if NVML itself fails."""
        with self._lock:
            return self._read()

    def _read(self) -> NvmlReading:
        nvml = self.nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise NvmlUnavailableError(f"nvmlDeviceGetCount failed: {exc}") from None
        self._drain_xids()
        devices: list[DeviceReading] = []
        lost: list[str] = []
        for index in range(count):
            try:
                gpu, instances = self._read_gpu(index)
            except GpuLostError as exc:
                uuid = self._uuid_of_index.get(index, "UUID unknown")
                lost.append(f"index {index} ({uuid}): {exc}")
                continue
            devices.append(gpu)
            devices.extend(inherit(instance, gpu) for instance in instances)
        return NvmlReading(
            driver_version=self._driver_version(), devices=tuple(devices), lost=tuple(lost)
        )

    def _driver_version(self) -> str:
        try:
            return _text(self.nvml.nvmlSystemGetDriverVersion())
        except self.nvml.NVMLError:
            return ""

    def _call(
        self, device: DeviceReading, field: str, fn: Callable[..., _T], *args: Any
    ) -> _T | None:
        """fn(*args), or None with the reason in `device.problems[field]`."""
        nvml = self.nvml
        try:
            return fn(*args)
        except (nvml.NVMLError_GpuIsLost, nvml.NVMLError_ResetRequired) as exc:
            raise GpuLostError(str(exc)) from None
        except nvml.NVMLError as exc:
            device.problems[field] = self._reason(exc)
        except (AttributeError, TypeError) as exc:  # an older nvidia-ml-py lacks the call
            device.problems[field] = f"not available in this nvidia-ml-py ({exc})"
        return None

    def _reason(self, exc: Exception) -> str:
        nvml = self.nvml
        if isinstance(exc, nvml.NVMLError_NotSupported):
            return "not supported on this GPU"
        if isinstance(exc, nvml.NVMLError_NoPermission):
            return "no permission"
        if isinstance(exc, nvml.NVMLError_FunctionNotFound):
            return "not in this driver's NVML (driver too old)"
        return str(exc) or type(exc).__name__

    def _read_gpu(self, index: int) -> tuple[DeviceReading, list[DeviceReading]]:
        nvml = self.nvml
        probe = DeviceReading(uuid="", index=index)
        handle = self._call(probe, "handle", nvml.nvmlDeviceGetHandleByIndex, index)
        uuid = None if handle is None else self._call(probe, "uuid", nvml.nvmlDeviceGetUUID, handle)
        if handle is None or uuid is None:
            raise GpuLostError(
                "no handle or UUID: " + "; ".join(f"{k}: {v}" for k, v in probe.problems.items())
            )
        gpu = DeviceReading(uuid=_text(uuid), index=index)
        self._uuid_of_index[index] = gpu.uuid
        name = self._call(gpu, "name", nvml.nvmlDeviceGetName, handle)
        gpu.model_name = _text(name) if name is not None else ""
        pci = self._call(gpu, "pci_bus_id", nvml.nvmlDeviceGetPciInfo, handle)
        if pci is not None:
            gpu.pci_bus_id = _text(getattr(pci, "busId", ""))
        self._read_fields(gpu, handle)
        gpu.xid_last = self._xid.get(gpu.uuid, 0) if not self.xid_problem else None
        if self.xid_problem:
            gpu.problems["xid_last"] = self.xid_problem
        instances = self._read_mig(gpu, handle)
        return gpu, instances

    def _read_fields(self, device: DeviceReading, handle: Any) -> None:
        nvml = self.nvml
        rates = self._call(device, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
        if rates is not None:
            device.utilization = min(1.0, max(0.0, float(rates.gpu) / 100.0))
        self._read_memory(device, handle)
        temperature = self._call(
            device,
            "temperature_c",
            nvml.nvmlDeviceGetTemperature,
            handle,
            nvml.NVML_TEMPERATURE_GPU,
        )
        if temperature is not None:
            device.temperature_c = float(temperature)
        power_mw = self._call(device, "power_w", nvml.nvmlDeviceGetPowerUsage, handle)
        if power_mw is not None:
            device.power_w = float(power_mw) / 1000.0
        limit_mw = self._call(device, "power_limit_w", nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        if limit_mw is not None:
            device.power_limit_w = float(limit_mw) / 1000.0
        reasons_fn = getattr(
            nvml,
            "nvmlDeviceGetCurrentClocksEventReasons",
            getattr(nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None),
        )
        if reasons_fn is None:
            device.problems["clock_event_reasons"] = "not available in this nvidia-ml-py"
        else:
            bits = self._call(device, "clock_event_reasons", reasons_fn, handle)
            if bits is not None:
                device.clock_event_reasons = reasons_from_bitmask(int(bits))
        self._read_ecc(device, handle)
        rows = self._call(device, "remapped_rows", nvml.nvmlDeviceGetRemappedRows, handle)
        if rows is not None:
            _, _, pending, failure = rows
            device.remapped_rows_pending = bool(pending)
            device.remapped_rows_failure = bool(failure)

    def _read_memory(self, device: DeviceReading, handle: Any) -> None:
        nvml = self.nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        info = None
        if version is not None:
            info = self._call(device, "memory", nvml.nvmlDeviceGetMemoryInfo, handle, version)
        if info is None:  # v1: `used` includes what v2 reports as `reserved`
            device.problems.pop("memory", None)
            info = self._call(device, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        if info is None:
            return
        device.memory_used_bytes = int(info.used)
        device.memory_free_bytes = int(info.free)
        device.memory_reserved_bytes = int(getattr(info, "reserved", 0))

    def _read_ecc(self, device: DeviceReading, handle: Any) -> None:
        nvml = self.nvml
        dbe = self._call(
            device,
            "ecc_dbe_volatile",
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if dbe is not None:
            device.ecc_dbe_volatile = int(dbe)
        sbe = self._call(
            device,
            "ecc_sbe_volatile",
            nvml.nvmlDeviceGetTotalEccErrors,
            handle,
            nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            nvml.NVML_VOLATILE_ECC,
        )
        if sbe is not None:
            device.ecc_sbe_volatile = int(sbe)

    # ------------------------------------------------------------------ MIG

    def _read_mig(self, gpu: DeviceReading, handle: Any) -> list[DeviceReading]:
        nvml = self.nvml
        mode = self._call(gpu, "mig_mode", nvml.nvmlDeviceGetMigMode, handle)
        if mode is None:
            if gpu.problems.get("mig_mode") == "not supported on this GPU":
                gpu.mig_mode = False  # no MIG on this GPU model: that is an answer, not a gap
                del gpu.problems["mig_mode"]
            return []
        gpu.mig_mode = int(mode[0]) == int(nvml.NVML_DEVICE_MIG_ENABLE)
        if not gpu.mig_mode:
            return []
        slots = self._call(gpu, "mig_devices", nvml.nvmlDeviceGetMaxMigDeviceCount, handle)
        profiles = self._profile_names(handle)
        instances = []
        for slot in range(int(slots or 0)):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            except nvml.NVMLError_NotFound:
                continue  # an empty slot
            except nvml.NVMLError as exc:
                gpu.problems[f"mig_device_{slot}"] = self._reason(exc)
                continue
            instance = self._read_instance(gpu, handle, mig, profiles)
            if instance is not None:
                instances.append(instance)
        return instances

    def _read_instance(
        self, gpu: DeviceReading, handle: Any, mig: Any, profiles: dict[int, str]
    ) -> DeviceReading | None:
        nvml = self.nvml
        probe = DeviceReading(uuid=gpu.uuid, index=gpu.index)
        gi_id = self._call(probe, "gpu_instance_id", nvml.nvmlDeviceGetGpuInstanceId, mig)
        if gi_id is None:
            gpu.problems["mig_instance"] = probe.problems.get("gpu_instance_id", "no GI id")
            return None
        instance = DeviceReading(
            uuid=gpu.uuid,
            index=gpu.index,
            model_name=gpu.model_name,
            pci_bus_id=gpu.pci_bus_id,
            gpu_instance_id=str(int(gi_id)),
            mig_mode=True,
        )
        mig_uuid = self._call(instance, "mig_uuid", nvml.nvmlDeviceGetUUID, mig)
        instance.mig_uuid = _text(mig_uuid) if mig_uuid is not None else ""
        if instance.mig_uuid in self._xid:  # an XID NVML attributed to this instance
            instance.xid_last = self._xid[instance.mig_uuid]
        instance.mig_profile = self._instance_profile(instance, handle, mig, int(gi_id), profiles)
        self._read_memory(instance, mig)
        # NVML has no utilisation per MIG instance (nor per MIG-enabled GPU): say so.
        instance.problems["utilization"] = "NVML gives no utilisation per MIG instance"
        return instance

    def _profile_names(self, handle: Any) -> dict[int, str]:
        """GPU-instance profile id -> name (`3g.40gb`), for the profiles this GPU offers."""
        nvml = self.nvml
        names: dict[int, str] = {}
        for profile in range(int(getattr(nvml, "NVML_GPU_INSTANCE_PROFILE_COUNT", 0))):
            try:
                info = nvml.nvmlDeviceGetGpuInstanceProfileInfo(handle, profile, 2)
            except (nvml.NVMLError, AttributeError, TypeError):
                continue
            name = _text(getattr(info, "name", "")).removeprefix("MIG ").strip()
            if name:
                names[int(info.id)] = name
        return names

    def _instance_profile(
        self, instance: DeviceReading, handle: Any, mig: Any, gi_id: int, names: dict[int, str]
    ) -> str:
        nvml = self.nvml
        gi = self._call(instance, "mig_profile", nvml.nvmlDeviceGetGpuInstanceById, handle, gi_id)
        if gi is not None:
            info = self._call(instance, "mig_profile", nvml.nvmlGpuInstanceGetInfo, gi)
            if info is not None and int(info.profileId) in names:
                instance.problems.pop("mig_profile", None)
                return names[int(info.profileId)]
        # Without the GPU-instance API (it may need privileges): slices and memory size.
        attributes = self._call(instance, "mig_profile", nvml.nvmlDeviceGetAttributes, mig)
        if attributes is None:
            return ""
        instance.problems.pop("mig_profile", None)
        memory_gb = math.ceil(int(attributes.memorySizeMB) / 1024)
        return f"{int(attributes.gpuInstanceSliceCount)}g.{memory_gb}gb"

    # ------------------------------------------------------------------ processes

    def running_processes(self) -> NvmlProcesses:
        """The processes NVML lists on every GPU and MIG instance (see `nvml_processes`).
        Raises NvmlUnavailableError if NVML itself fails."""
        with self._lock:
            try:
                return list_processes(self.nvml, self._reason)
            except self.nvml.NVMLError as exc:
                raise NvmlUnavailableError(f"nvmlDeviceGetCount failed: {exc}") from None

    # ------------------------------------------------------------------ XID events

    def _watch_xids(self) -> None:
        nvml = self.nvml
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as exc:
            self.xid_problem = f"cannot create an NVML event set: {self._reason_any(exc)}"
            return
        problems = []
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            self.xid_problem = f"nvmlDeviceGetCount failed: {exc}"
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                nvml.nvmlDeviceRegisterEvents(
                    handle, nvml.nvmlEventTypeXidCriticalError, self._event_set
                )
            except nvml.NVMLError as exc:
                problems.append(f"GPU {index}: {self._reason(exc)}")
        if problems and len(problems) == count:
            self.xid_problem = "XID events: " + "; ".join(problems)
        elif problems:
            log.warning("XID events not watched on some GPUs", problems="; ".join(problems))

    def _reason_any(self, exc: Exception) -> str:
        return self._reason(exc) if isinstance(exc, self.nvml.NVMLError) else str(exc)

    def _drain_xids(self) -> None:
        nvml = self.nvml
        if self._event_set is None:
            return
        for _ in range(MAX_EVENTS_PER_READ):
            try:
                event = nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as exc:
                log.warning("reading NVML XID events failed", error=str(exc))
                return
            if not int(event.eventType) & int(nvml.nvmlEventTypeXidCriticalError):
                continue
            try:
                uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
            except nvml.NVMLError as exc:
                log.warning("XID event for a GPU without a UUID", error=str(exc))
                continue
            xid = int(event.eventData)
            self._xid[uuid] = xid
            log.warning("GPU reported an XID", gpu=uuid, xid=xid)

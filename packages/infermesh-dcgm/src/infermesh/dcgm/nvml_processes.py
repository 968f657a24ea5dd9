"""The processes NVML lists on each GPU and MIG instance, for replica discovery (synchronous).

Called by `NvmlReader.running_processes` in the adapter's worker thread, with the reader's
NVML module. On a MIG-enabled GPU each instance is asked on its own handle (the GPU's handle
answers for every instance only with privileges); a process NVML places on a GPU instance
(`gpuInstanceId`) is keyed to that instance, `<GPU UUID>/gi<id>`, like its GpuState.
NotSupported and NoPermission are normal answers, recorded per GPU in `unlisted`; a lost GPU is
left out (the telemetry read reports it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from infermesh.dcgm.reading import mig_key
from infermesh.dcgm.replica_gpus import GpuProcess

__all__ = ["NO_INSTANCE", "NvmlProcesses", "list_processes"]

NO_INSTANCE = 0xFFFFFFFF
"""`gpuInstanceId` of a process that runs on no MIG instance (NVML_VALUE_NOT_AVAILABLE)."""
PROCESS_LISTS = (
    ("compute", "nvmlDeviceGetComputeRunningProcesses"),
    ("graphics", "nvmlDeviceGetGraphicsRunningProcesses"),
)


@attrs.frozen
class NvmlProcesses:
    """The processes NVML lists on each GPU and MIG instance, and the GPUs it could not ask."""

    processes: tuple[GpuProcess, ...] = ()
    unlisted: dict[str, str] = attrs.field(factory=dict)
    """GpuKey `gpu_uuid` -> why NVML listed none of its processes (`compute: no permission`)."""


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def list_processes(nvml: Any, reason: Callable[[Exception], str]) -> NvmlProcesses:
    """Every GPU's and MIG instance's processes; `reason(exc)` words an NVMLError.

    Raises `nvml.NVMLError` only when the GPUs cannot be counted."""
    count = int(nvml.nvmlDeviceGetCount())
    found: set[GpuProcess] = set()
    unlisted: dict[str, str] = {}
    for index in range(count):
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except nvml.NVMLError:
            continue  # a lost GPU: the telemetry read says so
        _list(nvml, reason, handle, uuid, None, found, unlisted)
        for gi_id, mig in _mig_handles(nvml, handle):
            _list(nvml, reason, mig, uuid, gi_id, found, unlisted)
    return NvmlProcesses(tuple(sorted(found, key=lambda p: (p.gpu, p.pid))), unlisted=unlisted)


def _mig_handles(nvml: Any, handle: Any) -> list[tuple[int, Any]]:
    try:
        if int(nvml.nvmlDeviceGetMigMode(handle)[0]) != int(nvml.NVML_DEVICE_MIG_ENABLE):
            return []
        slots = int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))
    except (nvml.NVMLError, AttributeError, TypeError):
        return []  # no MIG on this GPU
    handles = []
    for slot in range(slots):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
            handles.append((int(nvml.nvmlDeviceGetGpuInstanceId(mig)), mig))
        except nvml.NVMLError:
            continue  # an empty slot
    return handles


def _list(
    nvml: Any,
    reason: Callable[[Exception], str],
    handle: Any,
    uuid: str,
    gi_id: int | None,
    found: set[GpuProcess],
    unlisted: dict[str, str],
) -> None:
    key = uuid if gi_id is None else mig_key(uuid, gi_id)
    problems = []
    for kind, name in PROCESS_LISTS:
        try:
            processes = getattr(nvml, name)(handle)
        except (nvml.NVMLError_GpuIsLost, nvml.NVMLError_ResetRequired):
            return
        except nvml.NVMLError as exc:
            problems.append(f"{kind}: {reason(exc)}")
            continue
        except AttributeError as exc:  # an older nvidia-ml-py
            problems.append(f"{kind}: not available in this nvidia-ml-py ({exc})")
            continue
        for process in processes:
            instance = getattr(process, "gpuInstanceId", None)
            on = key
            if gi_id is None and instance is not None and int(instance) != NO_INSTANCE:
                on = mig_key(uuid, int(instance))
            found.add(GpuProcess(pid=int(process.pid), gpu=on))
    if len(problems) == len(PROCESS_LISTS):
        unlisted[key] = "; ".join(problems)

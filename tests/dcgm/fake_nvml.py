"""A fake `pynvml` for the NVML adapter tests: recorded values of an H100, a consumer GPU (no
ECC, no MIG) and an A100 in MIG mode, the processes each lists, and the real `pynvml` error
classes (an exception class in a field is raised by that call)."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace
from typing import Any

import attrs
import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints

GIB = 1024**3
H100 = "GPU-8d6b4c2a-1f3e-4a5b-9c7d-0e1f2a3b4c5d"
RTX = "GPU-0a9b8c7d-6e5f-4a3b-2c1d-0e9f8a7b6c5d"
A100 = "GPU-3c4d5e6f-7a8b-4c9d-8e0f-1a2b3c4d5e6f"
NOT_SUPPORTED = pynvml.NVMLError_NotSupported


@attrs.define
class FakeMig:
    uuid: str
    gi_id: int
    profile_id: int
    memory: tuple[int, int, int]  # total, free, used (bytes)
    slices: int
    processes: Any = ()
    """pids of the compute processes on this instance (or an exception class)."""


@attrs.define
class FakeGpu:
    """What NVML returned for one GPU; an exception class in a field is raised by that call."""

    uuid: str
    name: str
    utilization: Any = 37
    memory: tuple[int, int, int, int] = (
        80 * GIB,
        512 * 1024**2,
        20 * GIB,
        60 * GIB - 512 * 1024**2,
    )
    """total, reserved, free, used (bytes), as nvmlDeviceGetMemoryInfo_v2 answers."""
    memory_v2_error: Any = None
    temperature: Any = 51
    power_mw: Any = 312_456
    limit_mw: Any = 700_000
    reasons: Any = 0
    ecc: Any = (0, 3)  # uncorrected, corrected (volatile)
    remapped: Any = (0, 0, 0, 0)
    mig_mode: Any = (0, 0)
    migs: list[FakeMig] = attrs.field(factory=list)
    mig_slots: int = 7
    gi_lookup: Any = None  # an exception class to raise from nvmlDeviceGetGpuInstanceById
    lost: bool = False
    processes: Any = ()
    """Compute processes on the GPU's own handle: pids, or (pid, GPU instance id) on a MIG GPU
    (NVML's aggregate answer, given with privileges), or an exception class."""
    graphics: Any = ()
    """pids of graphics processes (or an exception class)."""


class FakeNvml:
    """The parts of `pynvml` the reader uses, answering from FakeGpus."""

    def __init__(self, gpus: list[FakeGpu], init_error: type[Exception] | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.events: list[SimpleNamespace] = []
        self.calls: list[tuple[str, int]] = []  # (function, thread id)
        self.shutdowns = 0
        self.freed_event_sets = 0

    def __getattr__(self, name: str) -> Any:
        # Constants and the real NVMLError_* classes come from nvidia-ml-py itself.
        if name.startswith(("NVML", "nvmlMemory_v2", "nvmlEventType")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _gpu(self, handle: Any) -> FakeGpu:
        self.calls.append((sys._getframe(1).f_code.co_name, threading.get_ident()))
        gpu: FakeGpu = handle.gpu
        if gpu.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return gpu

    @staticmethod
    def _answer(value: Any) -> Any:
        if isinstance(value, type) and issubclass(value, Exception):
            raise value()
        return value

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error()

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "570.124.06"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return SimpleNamespace(gpu=self.gpus[index], mig=None)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        if handle.mig is not None:
            return str(handle.mig.uuid)
        return self._gpu(handle).uuid

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return self._gpu(handle).name

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        self._gpu(handle)
        return SimpleNamespace(busId=b"00000000:18:00.0")

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        return SimpleNamespace(gpu=self._answer(self._gpu(handle).utilization), memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: Any, version: int | None = None) -> Any:
        if handle.mig is not None:
            total, free, used = handle.mig.memory
            return SimpleNamespace(total=total, free=free, used=used)
        gpu = self._gpu(handle)
        total, reserved, free, used = gpu.memory
        if version is not None and gpu.memory_v2_error is not None:
            raise gpu.memory_v2_error()
        if version is None:  # v1: reserved is part of used
            return SimpleNamespace(total=total, free=free, used=used + reserved)
        return SimpleNamespace(
            version=version, total=total, reserved=reserved, free=free, used=used
        )

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return int(self._answer(self._gpu(handle).temperature))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return int(self._answer(self._gpu(handle).power_mw))

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any) -> int:
        return int(self._answer(self._gpu(handle).limit_mw))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return int(self._answer(self._gpu(handle).reasons))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        assert counter == pynvml.NVML_VOLATILE_ECC
        uncorrected, corrected = self._answer(self._gpu(handle).ecc)
        return int(uncorrected if error_type == 1 else corrected)

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        answer: tuple[int, int, int, int] = self._answer(self._gpu(handle).remapped)
        return answer

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        return list(self._answer(self._gpu(handle).mig_mode))

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any) -> int:
        return self._gpu(handle).mig_slots

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: int) -> Any:
        migs = self._gpu(handle).migs
        if index >= len(migs):
            raise pynvml.NVMLError_NotFound()
        return SimpleNamespace(gpu=handle.gpu, mig=migs[index])

    def nvmlDeviceGetGpuInstanceId(self, mig: Any) -> int:
        return int(mig.mig.gi_id)

    def nvmlDeviceGetGpuInstanceProfileInfo(self, handle: Any, profile: int, version: int) -> Any:
        names = {0: "MIG 1g.10gb", 1: "MIG 2g.20gb", 2: "MIG 3g.40gb"}
        if profile not in names:
            raise pynvml.NVMLError_NotSupported()
        return SimpleNamespace(id=profile + 10, name=names[profile].encode())

    def nvmlDeviceGetGpuInstanceById(self, handle: Any, gi_id: int) -> Any:
        gpu = self._gpu(handle)
        if gpu.gi_lookup is not None:
            raise gpu.gi_lookup()
        (mig,) = [m for m in gpu.migs if m.gi_id == gi_id]
        return SimpleNamespace(profile_id=mig.profile_id)

    def nvmlGpuInstanceGetInfo(self, gi: Any) -> Any:
        return SimpleNamespace(profileId=gi.profile_id)

    def nvmlDeviceGetAttributes(self, mig: Any) -> Any:
        return SimpleNamespace(
            gpuInstanceSliceCount=mig.mig.slices, memorySizeMB=mig.mig.memory[0] // 1024**2
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        if handle.mig is not None:
            pids = self._answer(handle.mig.processes)
            return [_process(pid, handle.mig.gi_id) for pid in pids]
        return [
            _process(*entry) if isinstance(entry, tuple) else _process(entry)
            for entry in self._answer(self._gpu(handle).processes)
        ]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[SimpleNamespace]:
        if handle.mig is not None:
            return []
        return [_process(pid) for pid in self._answer(self._gpu(handle).graphics)]

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: Any, types: int, event_set: str) -> None:
        assert types == pynvml.nvmlEventTypeXidCriticalError
        assert event_set == "event-set"

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> Any:
        assert timeout_ms == 0
        if not self.events:
            raise pynvml.NVMLError_Timeout()
        return self.events.pop(0)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.freed_event_sets += 1

    def xid(self, index: int, xid: int) -> None:
        """Queue an XID critical-error event for GPU `index`."""
        self.events.append(
            SimpleNamespace(
                device=SimpleNamespace(gpu=self.gpus[index], mig=None),
                eventType=pynvml.nvmlEventTypeXidCriticalError,
                eventData=xid,
            )
        )


def _process(pid: int, gi_id: int = 0xFFFFFFFF) -> SimpleNamespace:
    """What nvmlDeviceGet*RunningProcesses returns per process (the v3 struct's fields)."""
    return SimpleNamespace(
        pid=pid, usedGpuMemory=1 << 30, gpuInstanceId=gi_id, computeInstanceId=gi_id
    )


def h100(processes: Any = ()) -> FakeGpu:
    return FakeGpu(uuid=H100, name="NVIDIA H100 80GB HBM3", reasons=0x4 | 0x1, processes=processes)


def consumer() -> FakeGpu:
    return FakeGpu(
        uuid=RTX,
        name="NVIDIA GeForce RTX 4090",
        memory_v2_error=pynvml.NVMLError_FunctionNotFound,  # an old driver: v1 only
        limit_mw=450_000,
        ecc=NOT_SUPPORTED,
        remapped=NOT_SUPPORTED,
        mig_mode=NOT_SUPPORTED,
    )


def a100_mig(gi_lookup: Any = None) -> FakeGpu:
    return FakeGpu(
        uuid=A100,
        name="NVIDIA A100-SXM4-80GB",
        utilization=NOT_SUPPORTED,  # not supported on MIG-enabled GPUs
        temperature=84,
        reasons=0x20,
        mig_mode=(1, 1),
        migs=[
            FakeMig(
                "MIG-aaaaaaaa-1111-5222-8333-444455556666", 1, 12, (40 * GIB, 30 * GIB, 10 * GIB), 3
            ),
            FakeMig(
                "MIG-bbbbbbbb-1111-5222-8333-444455556666", 5, 11, (20 * GIB, 5 * GIB, 15 * GIB), 2
            ),
        ],
        gi_lookup=gi_lookup,
    )

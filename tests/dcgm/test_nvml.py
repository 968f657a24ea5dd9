"""`[[gpus]] kind = "nvml"` on a fake NVML module: recorded values of an H100, a consumer GPU
(no ECC, no MIG) and an A100 in MIG mode, raising the real `pynvml` error classes. Checks every
unit, each NotSupported field left out with its reason, MIG instances, XID events, a lost GPU,
and that the reads run off the event loop."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import attrs
import pynvml  # type: ignore[import-untyped]  # nvidia-ml-py ships no type hints
import pytest
import structlog.testing

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext
from infermesh.core.model import GpuKey, GpuState
from infermesh.dcgm.nvml import NvmlAdapter, load_nvml
from infermesh.dcgm.nvml_reader import NvmlReader

pytestmark = pytest.mark.anyio

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


def h100() -> FakeGpu:
    return FakeGpu(uuid=H100, name="NVIDIA H100 80GB HBM3", reasons=0x4 | 0x1)


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


def context(**options: object) -> AdapterContext:
    return AdapterContext(node="n1", name="nvml0", url="", poll_interval_s=0.05, options=options)


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml([h100(), consumer(), a100_mig()])


@pytest.fixture
def reader(fake: FakeNvml) -> Iterator[NvmlReader]:
    reader = NvmlReader(fake)
    reader.start()
    yield reader
    reader.close()


def by_uuid(reader: NvmlReader) -> dict[str, Any]:
    return {device.key_uuid: device for device in reader.read().devices}


async def states(adapter: NvmlAdapter) -> dict[str, GpuState]:
    """Every GPU's state after one more read (the deltas applied by the adapter's tracker)."""
    await adapter.poll_once()
    return {key.gpu_uuid: state for key, state in adapter.states.items()}


async def test_inventory_and_every_field_in_normalised_units(fake: FakeNvml) -> None:
    adapter = NvmlAdapter(context(), nvml=fake)
    try:
        got = await states(adapter)
    finally:
        await adapter.aclose()
    assert set(got) == {H100, RTX, A100, f"{A100}/gi1", f"{A100}/gi5"}
    h = got[H100]
    assert (h.index, h.name) == (0, "NVIDIA H100 80GB HBM3")
    assert h.utilization == 0.37
    assert h.memory_total_bytes == 80 * GIB
    assert h.memory_used_bytes == 60 * GIB  # used + the driver's reserved framebuffer
    assert h.vram_headroom == 0.25
    assert h.temperature_c == 51.0
    assert h.power_w == 312.456  # mW -> W
    assert h.power_limit_w == 700.0
    assert h.clock_event_reasons == {"sw_power_cap"}  # gpu_idle is dropped
    assert h.throttle_reasons == ("sw_power_cap",)
    assert h.ecc_dbe_volatile == 0
    assert h.health == (True, "ok")
    assert h.labels.get("pci_bus_id") == "00000000:18:00.0"
    assert fake.shutdowns == 1
    assert fake.freed_event_sets == 1


def test_not_supported_fields_are_left_out_with_their_reason(reader: NvmlReader) -> None:
    rtx = by_uuid(reader)[RTX]
    assert rtx.ecc_dbe_volatile is None
    assert rtx.remapped_rows_pending is None
    assert rtx.problems == {
        "ecc_dbe_volatile": "not supported on this GPU",
        "ecc_sbe_volatile": "not supported on this GPU",
        "remapped_rows": "not supported on this GPU",
    }
    assert rtx.mig_mode is False  # NotSupported for MIG mode: this GPU has no MIG
    # nvmlDeviceGetMemoryInfo_v2 missing from the driver: v1, whose `used` includes reserved.
    assert (rtx.memory_used_bytes, rtx.memory_free_bytes) == (60 * GIB, 20 * GIB)
    assert rtx.memory_total_bytes == 80 * GIB
    assert rtx.power_limit_w == 450.0
    h100_reading = by_uuid(reader)[H100]
    assert h100_reading.ecc_sbe_volatile == 3
    assert h100_reading.problems == {}


async def test_mig_instances_with_profiles_memory_and_the_gpus_condition(fake: FakeNvml) -> None:
    adapter = NvmlAdapter(context(), nvml=fake)
    try:
        got = await states(adapter)
    finally:
        await adapter.aclose()
    parent, big, small = got[A100], got[f"{A100}/gi1"], got[f"{A100}/gi5"]
    assert parent.utilization == 0.0  # NotSupported in MIG mode
    assert (big.mig_profile, small.mig_profile) == ("3g.40gb", "2g.20gb")
    assert big.labels.mig_profile == "3g.40gb"
    assert big.labels.get("mig_uuid") == "MIG-aaaaaaaa-1111-5222-8333-444455556666"
    assert big.labels.get("parent_gpu_uuid") == A100
    assert (big.memory_used_bytes, big.memory_total_bytes) == (10 * GIB, 40 * GIB)
    assert small.vram_headroom == 0.25
    for instance in (big, small):  # device-wide readings reach every instance
        assert instance.temperature_c == 84.0
        assert instance.throttle_reasons == ("sw_thermal_slowdown",)


def test_mig_profile_from_attributes_without_the_gpu_instance_api() -> None:
    reader = NvmlReader(FakeNvml([a100_mig(gi_lookup=pynvml.NVMLError_NoPermission)]))
    reader.start()
    try:
        devices = by_uuid(reader)
    finally:
        reader.close()
    assert devices[f"{A100}/gi1"].mig_profile == "3g.40gb"
    assert devices[f"{A100}/gi5"].mig_profile == "2g.20gb"
    assert devices[f"{A100}/gi1"].problems == {
        "utilization": "NVML gives no utilisation per MIG instance"
    }


async def test_an_xid_event_makes_its_gpu_unhealthy_and_stays_reported(fake: FakeNvml) -> None:
    adapter = NvmlAdapter(context(), nvml=fake)
    try:
        assert (await states(adapter))[H100].xid_last == 0
        fake.xid(0, 79)
        with structlog.testing.capture_logs() as logs:
            changed = await states(adapter)
        assert changed[H100].health == (False, "XID 79 reported")
        assert [e["xid"] for e in logs if e["event"] == "GPU reported an XID"] == [79]
        assert (await states(adapter))[H100].xid_last == 79  # like DCGM's last-XID gauge
        # An XID on the MIG GPU reaches its instances too.
        fake.xid(2, 48)
        after = await states(adapter)
        assert after[f"{A100}/gi1"].xid_last == 48
    finally:
        await adapter.aclose()


async def test_a_lost_gpu_keeps_its_last_state_and_is_logged_once(fake: FakeNvml) -> None:
    adapter = NvmlAdapter(context(), nvml=fake)
    try:
        await states(adapter)
        before = adapter.states[GpuKey("n1", RTX)]
        fake.gpus[1].lost = True
        with structlog.testing.capture_logs() as logs:
            await states(adapter)
            await states(adapter)
        lost = [e for e in logs if e["event"].startswith("GPU lost")]
        assert len(lost) == 1
        assert RTX in lost[0]["gpu"]
        assert adapter.states[GpuKey("n1", RTX)] == before
        assert GpuKey("n1", H100) in adapter.states
    finally:
        await adapter.aclose()


async def test_nvml_calls_run_off_the_event_loop_thread(fake: FakeNvml) -> None:
    adapter = NvmlAdapter(context(), nvml=fake)
    fake.calls.clear()
    try:
        await adapter.poll_once()
    finally:
        await adapter.aclose()
    threads = {thread for _, thread in fake.calls}
    assert fake.calls
    assert threading.get_ident() not in threads


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (pynvml.NVMLError_LibraryNotFound, r"libnvidia-ml\.so\.1\) is not installed"),
        (pynvml.NVMLError_DriverNotLoaded, "kernel driver is not loaded"),
        (pynvml.NVMLError_NoPermission, "no permission to use NVML"),
    ],
)
def test_no_usable_nvml_is_a_startup_error_naming_the_adapter(
    error: type[Exception], message: str
) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"gpus 'nvml0' \(kind nvml\): NVML is not usable on this machine: .*{message}",
    ):
        NvmlAdapter(context(), nvml=FakeNvml([], init_error=error))


def test_missing_bindings_name_the_distribution_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ConfigError, match=r"gpus 'x': .*pip install nvidia-ml-py"):
        load_nvml("gpus 'x'")


def test_url_and_unknown_options_are_refused(fake: FakeNvml) -> None:
    with pytest.raises(
        ConfigError, match="unknown option devices; the only option is replica_discovery_interval_s"
    ):
        NvmlAdapter(context(devices=[0]), nvml=fake)
    for bad in (-1, "30s", True):
        with pytest.raises(ConfigError, match=r"options\.replica_discovery_interval_s must be"):
            NvmlAdapter(context(replica_discovery_interval_s=bad), nvml=fake)
    bad = attrs.evolve(context(), url="http://127.0.0.1:9400/metrics")
    with pytest.raises(ConfigError, match="reads the local GPUs and takes no url"):
        NvmlAdapter(bad, nvml=fake)

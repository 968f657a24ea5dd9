"""`[[gpus]] kind = "nvml"` on a fake NVML module: recorded values of an H100, a consumer GPU
(no ECC, no MIG) and an A100 in MIG mode, raising the real `pynvml` error classes. Checks every
unit, each NotSupported field left out with its reason, MIG instances, XID events, a lost GPU,
and that the reads run off the event loop."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
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
from tests.dcgm.fake_nvml import A100, GIB, H100, RTX, FakeNvml, a100_mig, consumer, h100

pytestmark = pytest.mark.anyio


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
    for interval in (-1, "30s", True):
        with pytest.raises(ConfigError, match=r"options\.replica_discovery_interval_s must be"):
            NvmlAdapter(context(replica_discovery_interval_s=interval), nvml=fake)
    with_url = attrs.evolve(context(), url="http://127.0.0.1:9400/metrics")
    with pytest.raises(ConfigError, match="reads the local GPUs and takes no url"):
        NvmlAdapter(with_url, nvml=fake)


def test_running_processes_per_gpu_and_mig_instance_with_the_gpus_nvml_cannot_ask(
    fake: FakeNvml,
) -> None:
    fake.gpus[0].processes = [13]
    fake.gpus[
        1
    ].processes = pynvml.NVMLError_NotSupported  # consumer GPUs may not list compute processes
    fake.gpus[1].graphics = pynvml.NVMLError_NoPermission
    fake.gpus[2].migs[0].processes = [11]  # asked on the instance's own handle
    fake.gpus[2].processes = [(12, 5)]  # NVML's aggregate answer, placing pid 12 on GI 5
    reader = NvmlReader(fake)
    reader.start()
    try:
        listed = reader.running_processes()
    finally:
        reader.close()
    assert {(p.pid, p.gpu) for p in listed.processes} == {
        (11, f"{A100}/gi1"),
        (12, f"{A100}/gi5"),
        (13, H100),
    }
    assert listed.unlisted == {RTX: "compute: not supported on this GPU; graphics: no permission"}

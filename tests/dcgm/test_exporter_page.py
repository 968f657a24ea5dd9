"""dcgm-exporter pages -> GpuStates: releases with `Hostname` and `hostname`, MIG instances,
absent fields, and every unit conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.core.model import GpuKey, GpuState
from infermesh.dcgm.clock_events import reasons_from_bitmask
from infermesh.dcgm.exporter_page import ExporterPageError, gpu_states, read_exporter_page

DATA = Path(__file__).parent / "data"
MIB = 1024 * 1024


def states_of(page: str, node: str = "n1") -> dict[str, GpuState]:
    reading = read_exporter_page((DATA / page).read_text())
    return {key.gpu_uuid: state for key, state in gpu_states(reading, node, 42.0).items()}


def test_release_with_Hostname_default_counters_in_normalised_units() -> None:
    states = states_of("release-4.5.3-4.8.2-Hostname.txt")
    busy = states["GPU-a1b2c3d4-6666-7777-8888-9999aaaabbbb"]
    assert busy.key == GpuKey(node="n1", gpu_uuid="GPU-a1b2c3d4-6666-7777-8888-9999aaaabbbb")
    assert busy.index == 1
    assert busy.name == "NVIDIA A100-SXM4-80GB"
    assert busy.utilization == 0.87  # DCGM_FI_DEV_GPU_UTIL 87 (%), not GR_ENGINE_ACTIVE 0.91
    assert busy.memory_used_bytes == (74358 + 689) * MIB  # reserved is not allocatable
    assert busy.memory_total_bytes == (74358 + 6204 + 689) * MIB  # used + free + reserved
    assert busy.temperature_c == 61.0
    assert busy.power_w == 312.75
    assert busy.last_updated == 42.0
    assert busy.labels.get("hostname") == "gpu-node-7"
    assert busy.labels.get("gpu_model") == "NVIDIA A100-SXM4-80GB"
    assert busy.labels.get("pci_bus_id") == "00000000:0F:00.0"
    assert busy.labels.gpu_uuid == busy.key.gpu_uuid
    # Fields this release does not export by default keep GpuState's defaults, and say healthy.
    assert busy.power_limit_w == 0.0
    assert busy.clock_event_reasons == frozenset()
    assert busy.ecc_dbe_volatile == 0
    assert busy.health == (True, "ok")
    idle = states["GPU-a1b2c3d4-0000-1111-2222-333344445555"]
    assert idle.utilization == 0.0
    assert idle.vram_headroom == pytest.approx(80562 / (80562 + 689))


def test_main_with_lowercase_hostname_reads_errors_and_clock_events() -> None:
    states = states_of("main-hostname-kubernetes.txt")
    assert {s.labels.get("hostname") for s in states.values()} == {"dgx-h100-03"}
    ok, failing, throttled = (
        states[f"GPU-5f0e2c6b-3a41-4c1f-9b0e-7d2a1c9e8f0{i}"] for i in (1, 2, 3)
    )
    assert ok.power_limit_w == 700.0
    assert ok.health == (True, "ok")
    assert failing.xid_last == 79
    assert failing.ecc_dbe_volatile == 2
    assert failing.remapped_rows_pending
    assert not failing.remapped_rows_failure
    assert failing.clock_event_reasons == frozenset()  # gpu_idle (bit 0x1) is not a problem
    assert not failing.healthy
    assert throttled.clock_event_reasons == {"sw_power_cap", "sw_thermal_slowdown", "hw_slowdown"}
    assert throttled.throttle_reasons == ("hw_slowdown", "sw_power_cap", "sw_thermal_slowdown")
    assert throttled.utilization == 1.0


def test_mig_instances_are_their_own_gpus_and_inherit_device_wide_fields() -> None:
    states = states_of("mig-a100-Hostname.txt")
    gpu = "GPU-0c1d2e3f-4a5b-6c7d-8e9f-a0b1c2d3e4f5"
    assert set(states) == {gpu, f"{gpu}/gi1", f"{gpu}/gi5", f"{gpu}/gi13"}
    big, mid, small = states[f"{gpu}/gi1"], states[f"{gpu}/gi5"], states[f"{gpu}/gi13"]
    assert (big.mig_profile, mid.mig_profile, small.mig_profile) == ("3g.20gb", "2g.10gb", "1g.5gb")
    assert big.labels.mig_profile == "3g.20gb"
    assert big.labels.get("parent_gpu_uuid") == gpu
    assert big.labels.get("gpu_instance_id") == "1"
    # No DCGM_FI_DEV_GPU_UTIL in MIG mode: the instance's graphics-engine activity instead.
    assert (big.utilization, mid.utilization, small.utilization) == (0.42, 0.97, 0.0)
    assert mid.memory_used_bytes == 8656 * MIB
    assert mid.memory_total_bytes == (8656 + 1200) * MIB
    # Device-wide series (no GPU_I_ID) reach every instance: a hot GPU is hot for all of them.
    for instance in (big, mid, small):
        assert instance.temperature_c == 83.0
        assert instance.power_w == 251.5
        assert instance.clock_event_reasons == {"sw_thermal_slowdown"}
    parent = states[gpu]
    assert parent.mig_profile == ""
    assert parent.memory_total_bytes == 0  # the page has no whole-GPU framebuffer series


def test_old_release_uuid_label_throttle_field_no_hostname_and_blank_values() -> None:
    (state,) = states_of("release-3.3-old-namespace-no-hostname.txt").values()
    assert state.key.gpu_uuid == "GPU-11112222-3333-4444-5555-666677778888"  # `uuid` label
    assert state.labels.get("hostname") is None
    assert state.clock_event_reasons == {"sw_power_cap"}  # DCGM_FI_DEV_CLOCK_THROTTLE_REASONS
    assert state.memory_total_bytes == (12209 + 2871) * MIB  # no FB_RESERVED: counts 0
    assert state.temperature_c == 71.0


def test_dcgm_blank_sentinels_and_nan_are_absent_values() -> None:
    page = (
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-x"} 9223372036854775794\n'
        'DCGM_FI_DEV_POWER_USAGE{gpu="0",UUID="GPU-x"} NaN\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-x"} 12\n'
    )
    (state,) = gpu_states(read_exporter_page(page), "n1", 1.0).values()
    assert state.temperature_c == 0.0
    assert state.power_w == 0.0
    assert state.utilization == 0.12


def test_clock_event_names_of_every_bit_and_unknown_bits() -> None:
    assert reasons_from_bitmask(0) == frozenset()
    assert reasons_from_bitmask(0x1) == frozenset()
    assert reasons_from_bitmask(0x4 | 0x40 | 0x80) == {
        "sw_power_cap",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
    }
    assert reasons_from_bitmask(0x2 | 0x10 | 0x100 | 0x200 | 0x400) == {
        "applications_clocks_setting",
        "sync_boost",
        "display_clock_setting",
        "board_limit",
        "reliability",
    }
    assert reasons_from_bitmask(0x8 | 0x1000) == {"hw_slowdown", "bit_0x1000"}
    with pytest.raises(ValueError, match="non-negative"):
        reasons_from_bitmask(-1)


def test_page_with_no_dcgm_series_is_a_clear_error() -> None:
    with pytest.raises(
        ExporterPageError, match=r"no DCGM_FI_\* series .* dcgm-exporter's /metrics"
    ):
        read_exporter_page((DATA / "html_error.txt").read_text())


def test_malformed_line_is_reported_with_its_line_number() -> None:
    with pytest.raises(ExporterPageError, match=r"malformed exposition: line 1: .*not-a-number"):
        read_exporter_page((DATA / "malformed.txt").read_text())


def test_series_without_uuid_is_a_clear_error() -> None:
    with pytest.raises(ExporterPageError, match="has no UUID label"):
        read_exporter_page('DCGM_FI_DEV_GPU_TEMP{gpu="0"} 40\n')


def test_empty_page_and_page_without_wanted_fields_are_no_gpus() -> None:
    assert read_exporter_page("").devices == {}
    only_clocks = 'DCGM_FI_DEV_SM_CLOCK{gpu="0",UUID="GPU-x"} 1410\n'
    assert read_exporter_page(only_clocks).devices == {}

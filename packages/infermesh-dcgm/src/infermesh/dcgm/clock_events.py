"""NVML / DCGM clock-event reason bits and the names InferMesh gives them.

`GpuState.clock_event_reasons` holds these names; the scorers treat `hw_slowdown`,
`hw_thermal_slowdown` and `hw_power_brake_slowdown` as severe and the others (power capping,
software thermal slowdown, ...) as a reason to send less work.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["CLOCK_EVENT_BITS", "reasons_from_bitmask"]

# nvmlClocksEventReason* (same bits as DCGM_CLOCKS_EVENT_REASON_*); 0x200 and 0x400 exist only
# in the older throttle-reason set (nvmlClocksThrottleReasonBoardLimit / Reliability).
CLOCK_EVENT_BITS: Mapping[str, int] = {
    "gpu_idle": 0x1,
    "applications_clocks_setting": 0x2,
    "sw_power_cap": 0x4,
    "hw_slowdown": 0x8,
    "sync_boost": 0x10,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
    "display_clock_setting": 0x100,
    "board_limit": 0x200,
    "reliability": 0x400,
}

_KNOWN_BITS = sum(CLOCK_EVENT_BITS.values())


def reasons_from_bitmask(bitmask: int) -> frozenset[str]:
    """The reason names of the set bits; an unknown bit becomes `bit_0x...` rather than vanish.

    `gpu_idle` is dropped: an idle GPU lowering its clocks is not a problem worth reporting.
    """
    if bitmask < 0:
        raise ValueError(f"clock-event reasons must be a non-negative bitmask, got {bitmask}")
    names = {name for name, bit in CLOCK_EVENT_BITS.items() if bitmask & bit}
    names.discard("gpu_idle")
    unknown = bitmask & ~_KNOWN_BITS
    bit = 1
    while unknown >= bit:
        if unknown & bit:
            names.add(f"bit_{bit:#x}")
        bit <<= 1
    return frozenset(names)

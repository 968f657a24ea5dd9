"""The GPU telemetry of a simulated replica, as the agent's DCGM adapter would publish it.

Each replica has a GPU of its own (`gpu_uuid_of`); its `GpuState` carries what dcgm-exporter
reports and the adapter keeps: utilisation, temperature, power and the clock-event reasons. A
degraded replica's GPU reports what `infermesh dev dcgm` (the emulator) serves for a GPU told to
run `hot`: 92 °C and `sw_thermal_slowdown`, with SM clocks in proportion to its speed. A healthy
GPU runs 45 °C idle, up to 75 °C fully busy, with no clock event. Memory is not reported: vLLM
preallocates the same share on every GPU, so VRAM headroom would not tell replicas apart.
"""

from __future__ import annotations

from infermesh.core.model import GpuKey, GpuState, Labels

__all__ = [
    "DEGRADED_REASONS",
    "DEGRADED_TEMPERATURE_C",
    "gpu_state",
    "gpu_uuid_of",
]

DEGRADED_TEMPERATURE_C = 92.0
"""The dcgm emulator's `hot` state: above `gpu_health`'s 90 °C "hot" mark."""
DEGRADED_REASONS = frozenset({"sw_thermal_slowdown"})
"""The clock-event reason the dcgm emulator's `hot` state reports."""
_IDLE_C = 45.0
_BUSY_C = 75.0
_POWER_LIMIT_W = 700.0
_SM_CLOCK_MHZ = 1980


def gpu_uuid_of(replica_id: str) -> str:
    """The UUID of the simulated GPU a replica runs on (its target's `gpu_uuid` label)."""
    return f"GPU-sim-{replica_id}"


def gpu_state(
    replica_id: str,
    node: str,
    *,
    utilization: float,
    speed_factor: float,
    now: float,
    version: int,
    gpu_name: str = "",
) -> GpuState:
    """The replica's GPU as scraped at `now`: `utilization` 0..1 is the share of the last scrape
    window it spent in engine steps; `speed_factor` < 1 marks the degraded (hot) GPU."""
    busy = min(1.0, max(0.0, utilization))
    degraded = speed_factor < 1.0
    uuid = gpu_uuid_of(replica_id)
    clock = str(round(_SM_CLOCK_MHZ * speed_factor))
    key = GpuKey(node=node, gpu_uuid=uuid)
    return GpuState(
        key=key,
        labels=Labels(
            node=node,
            gpu_uuid=uuid,
            custom=(("gpu_model", gpu_name), ("sm_clock_mhz", clock)),
        ),
        name=gpu_name,
        utilization=busy,
        temperature_c=DEGRADED_TEMPERATURE_C if degraded else _IDLE_C + (_BUSY_C - _IDLE_C) * busy,
        power_w=_POWER_LIMIT_W * (0.98 if degraded else 0.3 + 0.6 * busy),
        power_limit_w=_POWER_LIMIT_W,
        clock_event_reasons=DEGRADED_REASONS if degraded else frozenset(),
        last_updated=now,
        version=version,
    )

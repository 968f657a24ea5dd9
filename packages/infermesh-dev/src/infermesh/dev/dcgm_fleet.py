"""The emulated GPUs behind the dcgm-exporter emulator: their state and their exposition page.

Sans-I/O: `DcgmFleet` holds N emulated GPUs (optionally split into MIG instances), applies the
control commands (`throttle`, `hot`, `xid`, `ecc`, `recover`) and renders the page dcgm-exporter
would serve for them, with its real metric names, label names and units. Besides the default
counters it renders the fields a deployment adds through its collectors CSV so InferMesh can see
throttling and memory errors: `DCGM_FI_DEV_CLOCKS_EVENT_REASONS`, `DCGM_FI_DEV_POWER_MGMT_LIMIT`,
`DCGM_FI_DEV_ECC_{SBE,DBE}_VOL_TOTAL` and `DCGM_FI_DEV_ROW_REMAP_PENDING`.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping

import attrs

__all__ = [
    "CLOCK_EVENT_BITS",
    "GPU_STATES",
    "ControlError",
    "DcgmFleet",
    "DcgmFleetConfig",
    "EmulatedGpu",
]

# add(name, type, help, labels, value): one sample line of the page being rendered.
_Add = Callable[[str, str, str, str, float], None]

# NVML's clocks-event reason bits (nvmlClocksEventReason*), by the names InferMesh uses.
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
}

GPU_STATES = ("ok", "throttle", "hot", "xid", "ecc")
"""What an emulated GPU can be told to be; `recover` (a command) brings it back to `ok`."""

# Defaults of each state: (speed factor, temperature °C, clock-event reasons).
_STATE_DEFAULTS: Mapping[str, tuple[float, float, tuple[str, ...]]] = {
    "ok": (1.0, 45.0, ()),
    "throttle": (0.5, 70.0, ("sw_power_cap",)),
    "hot": (0.6, 92.0, ("sw_thermal_slowdown",)),
    "xid": (1.0, 45.0, ()),
    "ecc": (1.0, 45.0, ()),
}
DEFAULT_XID = 79  # "GPU has fallen off the bus"

# Published figures of the cards the emulator knows: (memory MiB, power limit W, max SM clock MHz),
# as their NVML names. Others take the config's memory and power limit and H100's SM clock.
MODEL_SPECS: Mapping[str, tuple[int, float, int]] = {
    "NVIDIA H100 80GB HBM3": (81559, 700.0, 1980),
    "NVIDIA A100-SXM4-80GB": (81920, 400.0, 1410),
    "NVIDIA A100-SXM4-40GB": (40960, 400.0, 1410),
    "NVIDIA L40S": (46068, 350.0, 2520),
    "NVIDIA A10": (23028, 150.0, 1695),
    "NVIDIA L4": (23034, 72.0, 2040),
}
_DEFAULT_SM_CLOCK_MHZ = 1980
_MIG_PROFILE = re.compile(r"([1-7])g\.(\d+)gb")


class ControlError(ValueError):
    """A control command the emulator cannot apply; the message says what to send instead."""


@attrs.frozen
class DcgmFleetConfig:
    """What the emulator serves: `gpus` GPUs of `model_name`, optionally in MIG mode.

    `mig` lists MIG profiles (e.g. `("3g.40gb", "3g.40gb")`) created on every GPU; empty means
    MIG disabled. `hostname` is the `Hostname`/`hostname` label value; `hostname_label` picks
    the spelling (releases up to 4.5.3-4.8.2 write `Hostname`, later ones `hostname`; empty:
    no label, as with `--no-hostname`).
    """

    gpus: int = 1
    model_name: str = "NVIDIA H100 80GB HBM3"
    memory_mib: int = 81559
    power_limit_w: float = 700.0
    utilization: float = 0.35
    memory_used_fraction: float = 0.6
    mig: tuple[str, ...] = ()
    hostname: str = "emulated-node"
    hostname_label: str = "Hostname"
    driver_version: str = "570.124.06"
    seed: int = 0
    uuids: tuple[str, ...] = ()
    """UUIDs of the GPUs in order; missing ones are derived from `seed` and the index."""
    model_names: tuple[str, ...] = ()
    """Model name of GPU 0, 1, ... (a node with mixed cards); missing ones are `model_name`.
    A name in `MODEL_SPECS` also sets that card's memory, power limit and top SM clock."""

    def __attrs_post_init__(self) -> None:
        if self.gpus < 1:
            raise ValueError(f"gpus must be at least 1, got {self.gpus}")
        if self.hostname_label not in ("Hostname", "hostname", ""):
            raise ValueError(
                f"hostname_label must be 'Hostname', 'hostname' or '', got {self.hostname_label!r}"
            )
        if len(self.uuids) > self.gpus:
            raise ValueError(f"{len(self.uuids)} UUIDs given for {self.gpus} GPUs")
        if len(self.model_names) > self.gpus:
            raise ValueError(f"{len(self.model_names)} model names given for {self.gpus} GPUs")
        if any(not name.strip() for name in self.model_names):
            raise ValueError("a GPU model name is empty")
        for profile in self.mig:
            if not _MIG_PROFILE.fullmatch(profile):
                raise ValueError(f"MIG profile {profile!r} is not like '3g.40gb'")
        if sum(int(p.split("g.")[0]) for p in self.mig) > 7:
            raise ValueError(f"MIG profiles {', '.join(self.mig)} need more than 7 slices")

    def model_of(self, index: int) -> str:
        """The model name of GPU `index`."""
        return self.model_names[index] if index < len(self.model_names) else self.model_name


def _derived_uuid(seed: int, index: int) -> str:
    digest = hashlib.sha256(f"infermesh-dcgm-emulator/{seed}/{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


@attrs.define
class EmulatedGpu:
    """One emulated GPU and what it was last told to be."""

    index: int
    uuid: str
    model_name: str = "NVIDIA H100 80GB HBM3"
    state: str = "ok"
    speed_factor: float = 1.0
    temperature_c: float = 45.0
    clock_event_reasons: tuple[str, ...] = ()
    xid: int = 0
    ecc_dbe: int = 0
    ecc_sbe: int = 0
    row_remap_pending: bool = False

    def snapshot(self) -> dict[str, object]:
        """The GPU as the control API shows it."""
        return {
            "uuid": self.uuid,
            "index": self.index,
            "model_name": self.model_name,
            "state": self.state,
            "speed_factor": self.speed_factor,
            "temperature_c": self.temperature_c,
            "clock_event_reasons": list(self.clock_event_reasons),
            "xid": self.xid,
            "ecc_dbe_volatile": self.ecc_dbe,
        }


def _number(
    body: Mapping[str, object], name: str, low: float, high: float, default: float
) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ControlError(f"{name!r} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ControlError(f"{name!r} must be in [{low:g}, {high:g}], got {value:g}")
    return float(value)


class DcgmFleet:
    """The emulated GPUs: control commands in, a dcgm-exporter page out."""

    def __init__(self, config: DcgmFleetConfig) -> None:
        self.config = config
        self.gpus = [
            EmulatedGpu(
                index=i,
                uuid=config.uuids[i] if i < len(config.uuids) else _derived_uuid(config.seed, i),
                model_name=config.model_of(i),
            )
            for i in range(config.gpus)
        ]
        self._by_uuid = {gpu.uuid: gpu for gpu in self.gpus}

    def gpu(self, uuid: str) -> EmulatedGpu:
        """The GPU with `uuid`; ControlError listing the known UUIDs if there is none."""
        gpu = self._by_uuid.get(uuid)
        if gpu is None:
            known = ", ".join(self._by_uuid)
            raise ControlError(f"no emulated GPU {uuid!r}; the GPUs are: {known}")
        return gpu

    def control(self, uuid: str, body: Mapping[str, object]) -> EmulatedGpu:
        """Apply `{"state": ..., ...}` to GPU `uuid` and return it.

        States: `throttle` (power capping, default factor 0.5), `hot` (92 °C and thermal
        slowdown, factor 0.6), `xid` (reports XID `xid`, default 79), `ecc` (reports `dbe`
        uncorrectable ECC errors, default 1, with row remapping pending), `recover` (all clear,
        factor 1). Optional keys: `factor` (0 < f <= 1: the speed of the GPU's replicas),
        `temperature_c`, `reasons` (clock-event reason names), `xid`, `dbe`.
        """
        gpu = self.gpu(uuid)
        state = body.get("state")
        allowed = ("throttle", "hot", "xid", "ecc", "recover")
        if state not in allowed:
            raise ControlError(f"'state' must be one of {', '.join(allowed)}; got {state!r}")
        unknown = set(body) - {"state", "factor", "temperature_c", "reasons", "xid", "dbe"}
        if unknown:
            raise ControlError(f"unknown key(s) {', '.join(sorted(unknown))}")
        name = "ok" if state == "recover" else str(state)
        factor, temperature, reasons = _STATE_DEFAULTS[name]
        factor = _number(body, "factor", 0.0, 1.0, factor)
        if factor <= 0.0:
            raise ControlError("'factor' must be above 0")
        temperature = _number(body, "temperature_c", 0.0, 150.0, temperature)
        reasons = self._reasons(body.get("reasons"), reasons)
        xid = int(_number(body, "xid", 1, 1000, DEFAULT_XID)) if name == "xid" else 0
        dbe = int(_number(body, "dbe", 1, 1e9, 1)) if name == "ecc" else 0
        gpu.state = name
        gpu.speed_factor = factor
        gpu.temperature_c = temperature
        gpu.clock_event_reasons = reasons
        gpu.xid = xid
        gpu.ecc_dbe = dbe
        gpu.row_remap_pending = dbe > 0
        return gpu

    @staticmethod
    def _reasons(value: object, default: tuple[str, ...]) -> tuple[str, ...]:
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise ControlError(f"'reasons' must be a list of names, got {value!r}")
        unknown = [r for r in value if r not in CLOCK_EVENT_BITS]
        if unknown:
            raise ControlError(
                f"unknown clock-event reason(s) {', '.join(unknown)}; "
                f"expected any of {', '.join(CLOCK_EVENT_BITS)}"
            )
        return tuple(dict.fromkeys(value))

    # ------------------------------------------------------------------ the page

    def render(self) -> str:
        """The /metrics page, in dcgm-exporter's layout (HELP and TYPE, then one line a GPU)."""
        families: dict[str, tuple[str, str, list[str]]] = {}

        def add(name: str, kind: str, help_text: str, labels: str, value: float) -> None:
            entry = families.setdefault(name, (kind, help_text, []))
            text = str(int(value)) if float(value).is_integer() else f"{value:g}"
            entry[2].append(f"{name}{{{labels}}} {text}")

        for gpu in self.gpus:
            self._render_gpu(gpu, add)
        lines: list[str] = []
        for name, (kind, help_text, samples) in families.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"

    def _labels(self, gpu: EmulatedGpu, instance: tuple[str, int] | None) -> str:
        config = self.config
        parts = [
            f'gpu="{gpu.index}"',
            f'UUID="{gpu.uuid}"',
            f'pci_bus_id="00000000:{0x18 + gpu.index * 0x10:02X}:00.0"',
            f'device="nvidia{gpu.index}"',
            f'modelName="{gpu.model_name}"',
        ]
        if instance is not None:
            parts.append(f'GPU_I_PROFILE="{instance[0]}"')
            parts.append(f'GPU_I_ID="{instance[1]}"')
        if config.hostname_label:
            parts.append(f'{config.hostname_label}="{config.hostname}"')
        parts.append(f'DCGM_FI_DRIVER_VERSION="{config.driver_version}"')
        return ",".join(parts)

    def _render_gpu(self, gpu: EmulatedGpu, add: _Add) -> None:
        config = self.config
        labels = self._labels(gpu, None)
        memory_mib, power_limit_w, max_clock_mhz = MODEL_SPECS.get(
            gpu.model_name, (config.memory_mib, config.power_limit_w, _DEFAULT_SM_CLOCK_MHZ)
        )
        busy = config.utilization * gpu.speed_factor if gpu.state != "xid" else 0.0
        power = power_limit_w * (0.98 if gpu.state == "throttle" else 0.55)
        reserved = 512
        used = int((memory_mib - reserved) * config.memory_used_fraction)
        free = memory_mib - reserved - used
        bitmask = sum(CLOCK_EVENT_BITS[r] for r in gpu.clock_event_reasons)
        add(
            "DCGM_FI_DEV_SM_CLOCK",
            "gauge",
            "SM clock frequency (in MHz).",
            labels,
            round(max_clock_mhz * gpu.speed_factor),
        )
        add("DCGM_FI_DEV_MEM_CLOCK", "gauge", "Memory clock frequency (in MHz).", labels, 2619)
        add("DCGM_FI_DEV_GPU_TEMP", "gauge", "GPU temperature (in C).", labels, gpu.temperature_c)
        add("DCGM_FI_DEV_POWER_USAGE", "gauge", "Power draw (in W).", labels, round(power, 3))
        add(
            "DCGM_FI_DEV_POWER_MGMT_LIMIT",
            "gauge",
            "Power management limit (in W).",
            labels,
            power_limit_w,
        )
        add(
            "DCGM_FI_DEV_XID_ERRORS",
            "gauge",
            "Value of the last XID error encountered.",
            labels,
            gpu.xid,
        )
        add(
            "DCGM_FI_DEV_CLOCKS_EVENT_REASONS",
            "gauge",
            "Current clock event reasons.",
            labels,
            bitmask,
        )
        add(
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
            "counter",
            "Total number of single-bit volatile ECC errors.",
            labels,
            gpu.ecc_sbe,
        )
        add(
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
            "counter",
            "Total number of double-bit volatile ECC errors.",
            labels,
            gpu.ecc_dbe,
        )
        add(
            "DCGM_FI_DEV_ROW_REMAP_PENDING",
            "gauge",
            "Whether rows are pending remapping.",
            labels,
            int(gpu.row_remap_pending),
        )
        add(
            "DCGM_FI_DEV_ROW_REMAP_FAILURE",
            "gauge",
            "Whether remapping of rows has failed",
            labels,
            0,
        )
        if not config.mig:
            add(
                "DCGM_FI_DEV_GPU_UTIL",
                "gauge",
                "GPU utilization (in %).",
                labels,
                round(busy * 100),
            )
            add("DCGM_FI_DEV_FB_FREE", "gauge", "Framebuffer memory free (in MiB).", labels, free)
            add("DCGM_FI_DEV_FB_USED", "gauge", "Framebuffer memory used (in MiB).", labels, used)
            add(
                "DCGM_FI_DEV_FB_RESERVED",
                "gauge",
                "Framebuffer memory reserved (in MiB).",
                labels,
                reserved,
            )
            add(
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
                "gauge",
                "Ratio of time the graphics engine is active.",
                labels,
                round(busy, 6),
            )
            return
        # MIG: memory and engine activity per GPU instance; GPU_UTIL is unsupported in MIG mode.
        for gi_id, profile in enumerate(config.mig, start=1):
            instance = self._labels(gpu, (profile, gi_id))
            match = _MIG_PROFILE.fullmatch(profile)
            assert match is not None  # checked by DcgmFleetConfig
            total = int(match.group(2)) * 1024
            inst_used = int(total * config.memory_used_fraction)
            add(
                "DCGM_FI_DEV_FB_FREE",
                "gauge",
                "Framebuffer memory free (in MiB).",
                instance,
                total - inst_used,
            )
            add(
                "DCGM_FI_DEV_FB_USED",
                "gauge",
                "Framebuffer memory used (in MiB).",
                instance,
                inst_used,
            )
            add(
                "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
                "gauge",
                "Ratio of time the graphics engine is active.",
                instance,
                round(busy, 6),
            )

"""A speed prior from the GPU model: how fast a replica should be before it has served anything.

The scorers rank replicas by their measured decode rate (infermesh.core.scoring.capacity). A
replica that has served nothing yet measures nothing; in a fresh fleet's first second, or on a
nearly idle large fleet, that is most replicas. Its GPU model is known all along (NVML's device
name, dcgm-exporter's `modelName` label: `GpuState.name`), and NVIDIA's datasheets say how fast
each model is:

- prefill is compute-bound: dense (no sparsity) BF16/FP16 tensor TFLOPS;
- decode is memory-bound: memory bandwidth, GB/s.

`gpu_speed` maps a device name (and MIG profile) to those two figures; `replica_speed` combines
the GPUs of one replica; `fill_rates` estimates the rates a set of replicas has not measured,
calibrated against the ones it has. Unknown names give None: no guess. Measured rates always
win. A throttled or degraded GPU is gpu_health's business: the prior is the healthy card's.

Pure functions of their arguments: no clock, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from statistics import median

import attrs

from infermesh.core.model import GpuState

__all__ = [
    "GPU_MODELS",
    "GpuSpeed",
    "decode_figure",
    "fill_rates",
    "gpu_speed",
    "prefill_figure",
    "replica_speed",
]


@attrs.frozen
class GpuSpeed:
    """Datasheet speed of one GPU (or MIG instance, or the GPUs of one replica)."""

    model: str
    """The model's name as reasons show it, e.g. "H100 SXM" or "A100 80GB SXM MIG 3g.40gb"."""
    prefill_tflops: float
    """Dense BF16/FP16 tensor TFLOPS (prefill is compute-bound)."""
    bandwidth_gbs: float
    """Memory bandwidth in GB/s (decode is memory-bound)."""


@attrs.frozen
class _Model:
    name: str
    tflops: float
    bandwidth_gbs: float
    memory_gb: float
    compute_slices: int = 7
    """MIG compute slices of the whole GPU (7 on A100/H100/H200/B200, 4 on A30)."""


# Dense BF16 tensor TFLOPS (FP16 where the card has no BF16) and memory bandwidth, from NVIDIA's
# datasheets (sparsity figures halved where only those are printed):
_H100_SXM = _Model("H100 SXM", 989, 3350, 80)  # nvidia.com/en-us/data-center/h100/: 1,979 sparse
_H100_PCIE = _Model("H100 PCIe", 756, 2000, 80)  # same page: 1,513 sparse, 2 TB/s
_H100_NVL = _Model("H100 NVL", 835, 3900, 94)  # same page: 1,671 sparse, 3.9 TB/s
_H800 = _Model("H800", 989, 3350, 80)  # H100 SXM silicon (China export variant, less NVLink)
_H200 = _Model("H200 SXM", 989, 4800, 141)  # nvidia.com/en-us/data-center/h200/: 4.8 TB/s
_H200_NVL = _Model("H200 NVL", 835, 4800, 141)  # same page: 1,671 sparse
_GH200 = _Model("GH200", 989, 4000, 96)  # nvidia.com/en-us/data-center/grace-hopper-superchip/
_GH200_144 = _Model("GH200 144GB", 989, 4900, 144)  # same page: HBM3e variant, 4.9 TB/s
_B200 = _Model("B200", 2250, 8000, 180)  # nvidia.com/en-us/data-center/hgx/ (HGX B200): 4.5 PF
_B100 = _Model("B100", 1750, 8000, 180)  # Blackwell datasheet: 3.5 PF sparse, 8 TB/s
_GB200 = _Model("GB200", 2500, 8000, 186)  # nvidia.com/en-us/data-center/gb200-nvl72/, per GPU
_A100_40 = _Model("A100 40GB SXM", 312, 1555, 40)  # nvidia.com/en-us/data-center/a100/
_A100_80 = _Model("A100 80GB SXM", 312, 2039, 80)  # same datasheet: 2,039 GB/s
_A100_PCIE_40 = _Model("A100 40GB PCIe", 312, 1555, 40)  # same datasheet
_A100_PCIE_80 = _Model("A100 80GB PCIe", 312, 1935, 80)  # same datasheet: 1,935 GB/s
_A800 = _Model("A800 80GB", 312, 2039, 80)  # A100 silicon (export variant)
# nvidia.com/en-us/data-center/products/a30-gpu/: 4 MIG compute slices, not 7
_A30 = _Model("A30", 165, 933, 24, compute_slices=4)
_A10 = _Model("A10", 125, 600, 24)  # nvidia.com/en-us/data-center/products/a10-gpu/
# A10G (AWS G5): NVIDIA publishes no datasheet; AWS gives 600 GB/s (GDDR6, 24 GB), and its
# tensor rate is commonly quoted at ~70 dense TFLOPS (fewer tensor-core clocks than the A10).
_A10G = _Model("A10G", 70, 600, 24)
_L40S = _Model("L40S", 362, 864, 48)  # nvidia.com/en-us/data-center/l40s/: 733 sparse
_L40 = _Model("L40", 181, 864, 48)  # nvidia.com/en-us/data-center/l40/: 362 sparse
_L4 = _Model("L4", 121, 300, 24)  # nvidia.com/en-us/data-center/l4/: 242 sparse
_T4 = _Model("T4", 65, 320, 16)  # nvidia.com/en-us/data-center/tesla-t4/: FP16 mixed, no BF16
_V100_SXM = _Model("V100 SXM2", 125, 900, 32)  # nvidia.com/en-us/data-center/v100/: FP16 tensor
_V100_PCIE = _Model("V100 PCIe", 112, 900, 32)  # same datasheet
_V100S = _Model("V100S PCIe", 130, 1134, 32)  # same datasheet
_RTX_6000_ADA = _Model("RTX 6000 Ada", 364, 960, 48)  # datasheet: 1,457 FP8 sparse = 4x dense
_RTX_A6000 = _Model("RTX A6000", 155, 768, 48)  # datasheet: 309.7 tensor TFLOPS sparse
_RTX_4090 = _Model("RTX 4090", 165, 1008, 24)  # Ada whitepaper: 165.2 BF16 dense, FP32 accum.

_RULES: tuple[tuple[frozenset[str], _Model], ...] = tuple(
    (frozenset(tokens.split()), model)
    for tokens, model in (
        # Most specific first: the first rule whose tokens are all in the name wins.
        ("gh200 144gb", _GH200_144),
        ("gh200 144g", _GH200_144),
        ("gh200", _GH200),
        ("gb200", _GB200),
        ("b200", _B200),
        ("b100", _B100),
        ("h200 nvl", _H200_NVL),
        ("h200", _H200),
        ("h100 nvl", _H100_NVL),
        ("h100 pcie", _H100_PCIE),
        ("h100", _H100_SXM),
        ("h800", _H800),
        ("a100 pcie 80gb", _A100_PCIE_80),
        ("a100 pcie", _A100_PCIE_40),
        ("a100 80gb", _A100_80),
        ("a100", _A100_40),
        ("a800", _A800),
        ("a30", _A30),
        ("a10g", _A10G),
        ("a10", _A10),
        ("l40s", _L40S),
        ("l40", _L40),
        ("l4", _L4),
        ("t4", _T4),
        ("v100s", _V100S),
        ("v100 pcie", _V100_PCIE),
        ("v100", _V100_SXM),
        ("6000 ada", _RTX_6000_ADA),
        ("a6000", _RTX_A6000),
        ("4090", _RTX_4090),
    )
)

GPU_MODELS: tuple[str, ...] = tuple(dict.fromkeys(model.name for _, model in _RULES))
"""The GPU models the prior knows, by the names reasons show."""

_TOKEN = re.compile(r"[a-z0-9]+")
_MIG = re.compile(r"^(?:(\d+)c\.)?(\d+)g\.(\d+)gb(?:\+me)?$")


@lru_cache(maxsize=1024)
def gpu_speed(name: str, mig_profile: str = "") -> GpuSpeed | None:
    """The datasheet speed of a GPU by its device name, or None for a name not known.

    `name` as NVML and dcgm-exporter spell it ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB",
    "Tesla T4", "NVIDIA GeForce RTX 4090"; case and punctuation do not matter). A MIG instance
    (`mig_profile` "3g.40gb", or the name NVML gives a MIG device: "... MIG 3g.40gb") gets its
    share of the whole GPU: compute slices of 7 (of 4 on an A30) for TFLOPS, its memory's share
    of the card's for bandwidth. A MIG profile that does not parse gives None.
    """
    text = name.lower()
    profile = mig_profile.strip().lower()
    head, sep, tail = text.partition(" mig ")
    if sep:
        text = head
        profile = profile or tail.strip()
    tokens = set(_TOKEN.findall(text))
    model = next((model for required, model in _RULES if required <= tokens), None)
    if model is None:
        return None
    if not profile:
        return GpuSpeed(model.name, float(model.tflops), float(model.bandwidth_gbs))
    match = _MIG.match(profile)
    if match is None:
        return None
    compute_text, slices_text, memory_text = match.groups()
    slices = int(compute_text or slices_text)
    compute = min(1.0, slices / model.compute_slices)
    memory = min(1.0, int(memory_text) / model.memory_gb)
    if not (compute > 0 and memory > 0):
        return None
    return GpuSpeed(
        f"{model.name} MIG {profile}", model.tflops * compute, model.bandwidth_gbs * memory
    )


def replica_speed(gpus: Sequence[GpuState]) -> GpuSpeed | None:
    """The speed of a replica on `gpus` (tensor parallel when several), or None when it has no
    GPU or any of its GPUs is not known.

    Several GPUs: the slowest GPU's figures times their count. A tensor-parallel replica's GPUs
    run each layer in lockstep, so the slowest one sets the pace; for identical GPUs (the usual
    case) this is the sum. The communication between them is not counted: a prior, not a model.
    """
    if not gpus:
        return None
    if len(gpus) == 1:
        gpu = gpus[0]
        return gpu_speed(gpu.name, gpu.mig_profile)
    speeds = [gpu_speed(gpu.name, gpu.mig_profile) for gpu in gpus]
    known = [s for s in speeds if s is not None]
    if len(known) < len(speeds):
        return None
    count = len(known)
    slowest_compute = min(known, key=lambda s: s.prefill_tflops)
    models = dict.fromkeys(s.model for s in known)
    label = f"{count}x {known[0].model}" if len(models) == 1 else f"{count}x mixed GPUs"
    return GpuSpeed(
        label,
        slowest_compute.prefill_tflops * count,
        min(s.bandwidth_gbs for s in known) * count,
    )


def prefill_figure(speed: GpuSpeed) -> float:
    """The figure prefill speed scales with: dense tensor TFLOPS."""
    return speed.prefill_tflops


def decode_figure(speed: GpuSpeed) -> float:
    """The figure decode speed scales with: memory bandwidth."""
    return speed.bandwidth_gbs


def fill_rates(
    measured: Sequence[float | None],
    priors: Sequence[GpuSpeed | None],
    figure: Callable[[GpuSpeed], float],
) -> list[float | None]:
    """Each replica's rate: its measured one; else an estimate from its GPU model; else None.

    `measured[i]` is replica i's measured rate (None: not measured), `priors[i]` its
    `replica_speed`. A replica not measured is estimated, in order of preference, at:

    1. the median measured rate of the replicas with the same GPU model;
    2. its `figure` (e.g. `prefill_figure`) times the median measured rate per unit of figure
       over the measured replicas whose model is known (the prior, calibrated);
    3. when nothing at all is measured: its `figure` (only ratios between replicas mean
       anything then).

    A replica whose model is not known, or that (2) cannot calibrate because the measured
    replicas' models are not known, stays None.
    """
    if len(measured) != len(priors):
        raise ValueError(f"fill_rates: {len(measured)} rates but {len(priors)} priors")
    if all(rate is not None for rate in measured):
        return list(measured)
    by_model: dict[str, list[float]] = {}
    per_unit: list[float] = []
    any_measured = False
    for rate, prior in zip(measured, priors, strict=True):
        if rate is None:
            continue
        any_measured = True
        if prior is None:
            continue
        by_model.setdefault(prior.model, []).append(rate)
        unit = figure(prior)
        if unit > 0:
            per_unit.append(rate / unit)
    scale: float | None = 1.0  # nothing measured: the figure alone
    if per_unit:
        scale = median(per_unit)
    elif any_measured:
        scale = None  # measured, but no known model to calibrate against
    model_rate = {model: median(rates) for model, rates in by_model.items()}
    filled: list[float | None] = []
    for rate, prior in zip(measured, priors, strict=True):
        if rate is not None or prior is None:
            filled.append(rate)
        elif prior.model in model_rate:
            filled.append(model_rate[prior.model])
        elif scale is not None:
            filled.append(scale * figure(prior))
        else:
            filled.append(None)
    return filled

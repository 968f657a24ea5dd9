"""The GPU-model speed prior: device names as NVML and dcgm-exporter spell them, MIG slices,
tensor-parallel replicas, unknown names, and estimates calibrated against measured rates."""

from __future__ import annotations

import pytest

from infermesh.core.model import GpuKey, GpuState
from infermesh.core.scoring.gpu_speed import (
    GPU_MODELS,
    decode_figure,
    fill_rates,
    gpu_speed,
    prefill_figure,
    replica_speed,
)


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA GH200 144G HBM3e", "GH200 144GB"),
        ("NVIDIA B200", "B200"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB PCIe"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA A30", "A30"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2"),
        ("Tesla V100-PCIE-16GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("nvidia  h100-80gb-hbm3", "H100 SXM"),
    ],
)
def test_real_device_names_map_to_their_model(name: str, model: str) -> None:
    speed = gpu_speed(name)
    assert speed is not None
    assert speed.model == model
    assert model in GPU_MODELS


@pytest.mark.parametrize("name", ["", "NVIDIA H20", "Quadro RTX 6000", "AMD Instinct MI300X"])
def test_an_unknown_name_gives_no_prior(name: str) -> None:
    assert gpu_speed(name) is None


def test_the_datasheet_ratios_order_the_fleet() -> None:
    h100, a100, a10 = (
        gpu_speed(f"NVIDIA {n}") for n in ("H100 80GB HBM3", "A100-SXM4-80GB", "A10")
    )
    assert h100 is not None
    assert a100 is not None
    assert a10 is not None
    # prefill: dense bf16 TFLOPS 989 / 312 / 125; decode: 3,350 / 2,039 / 600 GB/s
    assert h100.prefill_tflops / a100.prefill_tflops == pytest.approx(989 / 312)
    assert a100.prefill_tflops / a10.prefill_tflops == pytest.approx(312 / 125)
    assert h100.bandwidth_gbs / a10.bandwidth_gbs == pytest.approx(3350 / 600)


def test_a_mig_instance_gets_its_slice_of_compute_and_memory() -> None:
    whole = gpu_speed("NVIDIA A100-SXM4-80GB")
    by_name = gpu_speed("NVIDIA A100-SXM4-80GB MIG 3g.40gb")
    by_label = gpu_speed("NVIDIA A100-SXM4-80GB", "3g.40gb")
    assert whole is not None
    assert by_name is not None
    assert by_name == by_label
    assert by_name.model == "A100 80GB SXM MIG 3g.40gb"
    assert by_name.prefill_tflops == pytest.approx(whole.prefill_tflops * 3 / 7)
    assert by_name.bandwidth_gbs == pytest.approx(whole.bandwidth_gbs / 2)
    one = gpu_speed("NVIDIA H100 80GB HBM3", "1g.10gb+me")
    assert one is not None
    assert one.bandwidth_gbs == pytest.approx(3350 / 8)
    a30 = gpu_speed("NVIDIA A30", "2g.12gb")  # an A30 has 4 compute slices
    assert a30 is not None
    assert a30.prefill_tflops == pytest.approx(165 / 2)
    assert gpu_speed("NVIDIA A100-SXM4-80GB", "half") is None


def gpu(name: str, index: int = 0) -> GpuState:
    return GpuState(key=GpuKey(node="n", gpu_uuid=f"GPU-{index}"), name=name, index=index)


def test_a_tensor_parallel_replica_counts_its_slowest_gpu_times_the_count() -> None:
    two = replica_speed([gpu("NVIDIA H100 80GB HBM3", 0), gpu("NVIDIA H100 80GB HBM3", 1)])
    assert two is not None
    assert two.model == "2x H100 SXM"
    assert two.prefill_tflops == pytest.approx(2 * 989)
    mixed = replica_speed([gpu("NVIDIA H100 80GB HBM3", 0), gpu("NVIDIA A10", 1)])
    assert mixed is not None
    assert mixed.prefill_tflops == pytest.approx(2 * 125)
    assert replica_speed([gpu("NVIDIA H100 80GB HBM3", 0), gpu("mystery", 1)]) is None
    assert replica_speed([]) is None


def test_measured_rates_win_and_a_model_measured_elsewhere_gives_its_median() -> None:
    h100 = gpu_speed("NVIDIA H100 80GB HBM3")
    a10 = gpu_speed("NVIDIA A10")
    rates = fill_rates(
        [100.0, 120.0, None, 30.0, None], [h100, h100, h100, a10, a10], decode_figure
    )
    assert rates == [100.0, 120.0, 110.0, 30.0, 30.0]


def test_an_unmeasured_model_is_scaled_from_the_measured_ones_by_its_datasheet_ratio() -> None:
    h100 = gpu_speed("NVIDIA H100 80GB HBM3")
    a10 = gpu_speed("NVIDIA A10")
    assert h100 is not None
    assert a10 is not None
    rates = fill_rates([None, 30.0, None], [h100, a10, None], prefill_figure)
    assert rates[0] == pytest.approx(30.0 * 989 / 125)
    assert rates[1] == 30.0
    assert rates[2] is None  # no model, no measurement: no estimate


def test_with_nothing_measured_the_prior_alone_ranks_the_replicas() -> None:
    h100 = gpu_speed("NVIDIA H100 80GB HBM3")
    a10 = gpu_speed("NVIDIA A10")
    assert fill_rates([None, None, None], [h100, a10, None], prefill_figure) == [989.0, 125.0, None]
    # measured replicas of unknown models cannot calibrate the prior
    assert fill_rates([50.0, None], [None, h100], prefill_figure) == [50.0, None]
    with pytest.raises(ValueError, match="2 rates but 1 priors"):
        fill_rates([1.0, None], [h100], prefill_figure)

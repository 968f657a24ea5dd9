"""GPU performance profiles for the engine model: how fast one emulated vLLM replica is.

Plain values only. Every GPU profile models one dense ~8B model in bf16 (Llama-3.1-8B-Instruct:
32 layers, 8 KV heads of 128, so 128 KiB of KV cache per token and 2 MiB per 16-token block;
16 GB of weights). Profiles with published vLLM figures carry them in `calibration` and were
fitted to them; `tests/dev/test_engine_calibration.py` runs each figure's benchmark through the
engine model and checks the result is within 20% of it. Cards without published figures are
derived from a measured card by memory-bandwidth and FLOPs ratios (`_derive`), and say so.

KV-cache blocks per card: (memory x 0.9 utilisation - 16 GB weights - ~2 GiB activations and
CUDA graphs) / 2 MiB per block, rounded down.
"""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_MODEL", "PROFILES", "CalibrationPoint", "GpuProfile", "get_profile"]

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""The model name an emulated replica serves unless told otherwise."""

_ATTENTION_FLOPS_PER_PAIR = 4 * 4096 * 32
"""Llama-3.1-8B prefill attention: QK^T and AV, 2 FLOPs each per (query, key) pair per model
dimension per layer."""
_LINEAR_FLOPS_PER_TOKEN = 2 * 8.0e9
"""Two FLOPs per parameter per token for the dense layers."""


@attrs.frozen
class CalibrationPoint:
    """One published benchmark result a profile is fitted to.

    A closed-loop run: `concurrency` clients each send a request of `input_tokens` prompt tokens
    that generates exactly `output_tokens`, and send the next when it finishes (vLLM's
    `vllm bench serve --max-concurrency C --request-rate inf --ignore-eos`). The figures are the
    published ones (None where the source gives none or where the model is not claimed to match
    it; the profile's comment says which and why).
    """

    concurrency: int
    input_tokens: int
    output_tokens: int
    output_tokens_per_s: float | None = None
    """Aggregate output tokens per second of the whole run."""
    ttft_s: float | None = None
    """Mean (or median, as published) time to first token."""
    itl_s: float | None = None
    """Mean (or median) time per output token after the first (vLLM's TPOT)."""


@attrs.frozen
class GpuProfile:
    """Speed and memory of one emulated GPU.

    A step with `n` sequences lasts `step_base_s + step_per_seq_s * n` seconds, plus
    `step_per_kv_token_s` per cached token read by each decoding sequence (attention over its
    context), plus `tokens / prefill_tokens_per_s` for prompt tokens computed in the step and
    `prefill_per_token_pair_s` per (new token, context token) pair of prefill attention.
    `num_gpu_blocks` KV blocks of `block_size` tokens each fit in memory. `instant` profiles
    bypass the engine model.
    """

    name: str
    gpu_name: str
    prefill_tokens_per_s: float
    step_base_s: float
    step_per_seq_s: float
    num_gpu_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.9
    instant: bool = False
    step_per_kv_token_s: float = 0.0
    prefill_per_token_pair_s: float = 0.0
    source: str = ""
    """Where the numbers come from: the publication fitted to, or the card derived from."""
    calibration: tuple[CalibrationPoint, ...] = ()
    """The published figures this profile was fitted to (empty for derived profiles)."""

    def __attrs_post_init__(self) -> None:
        if not self.instant and self.num_gpu_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"profile {self.name!r}: {self.num_gpu_blocks} blocks of {self.block_size} tokens "
                f"cannot hold one sequence of max_model_len={self.max_model_len}"
            )

    def step_s(
        self,
        num_seqs: int,
        prefill_tokens: int,
        kv_tokens: int = 0,
        prefill_pairs: float = 0.0,
    ) -> float:
        """Duration of one engine step (see the class docstring for the terms)."""
        if self.instant:
            return 0.0
        return (
            self.step_base_s
            + self.step_per_seq_s * num_seqs
            + self.step_per_kv_token_s * kv_tokens
            + prefill_tokens / self.prefill_tokens_per_s
            + self.prefill_per_token_pair_s * prefill_pairs
        )


def _pair_s(prefill_tokens_per_s: float) -> float:
    """Prefill attention cost per token pair, at the same efficiency as the dense layers."""
    return _ATTENTION_FLOPS_PER_PAIR / _LINEAR_FLOPS_PER_TOKEN / prefill_tokens_per_s


def _derive(
    base: GpuProfile,
    *,
    name: str,
    gpu_name: str,
    bandwidth_ratio: float,
    compute_ratio: float,
    num_gpu_blocks: int,
    max_num_seqs: int = 256,
    note: str,
) -> GpuProfile:
    """A card without published figures, scaled from `base`: decode is memory-bound (weights
    and KV reads take 1/bandwidth_ratio as long), prefill is compute-bound (compute_ratio of the
    tokens per second)."""
    prefill = base.prefill_tokens_per_s * compute_ratio
    return GpuProfile(
        name=name,
        gpu_name=gpu_name,
        prefill_tokens_per_s=prefill,
        step_base_s=base.step_base_s / bandwidth_ratio,
        step_per_seq_s=base.step_per_seq_s / bandwidth_ratio,
        step_per_kv_token_s=base.step_per_kv_token_s / bandwidth_ratio,
        prefill_per_token_pair_s=_pair_s(prefill),
        num_gpu_blocks=num_gpu_blocks,
        max_num_seqs=max_num_seqs,
        source=(
            f"derived from {base.name!r}: memory bandwidth x{bandwidth_ratio:.3f}, "
            f"bf16 dense FLOPs x{compute_ratio:.3f} ({note}); no published vLLM figure used"
        ),
    )


# H100 SXM 80GB (3.35 TB/s, 989 dense bf16 TFLOPS). Fitted to InferenceBench's published
# concurrency sweep, https://yobitelcomm.github.io/bench/recipes/concurrency-sweep/ (vLLM 0.21.0,
# Llama-3.1-8B-Instruct fp16, one H100-80GB-HBM3, workload llm.inference.chatbot-short):
#   conc 1: 122.2 tok/s, TTFT p50 13.98 ms, TPOT p50 6.48 ms
#   conc 4: 580.3 tok/s, TTFT p50 22.75 ms, TPOT p50 6.59 ms
#   conc 16: 1384.2 tok/s, TTFT p50 41.69 ms, TPOT p50 10.94 ms
# The page gives no token lengths; we take 200 prompt / 256 output tokens (a short chat turn).
# Not claimed: the conc-1 throughput (122 tok/s is below the 1/TPOT = 154 tok/s its own TTFT and
# TPOT imply, so it includes client time between requests) and TTFT above conc 1 (the sweep's
# prompts vary in length, so arrivals spread out; fixed-length closed loops start in lockstep).
_H100_PREFILL = 26_000.0
_H100 = GpuProfile(
    name="h100",
    gpu_name="NVIDIA H100 80GB HBM3",
    prefill_tokens_per_s=_H100_PREFILL,
    step_base_s=0.0060,
    step_per_seq_s=0.00028,
    step_per_kv_token_s=4.9e-8,  # 128 KiB per token at ~80% of 3.35 TB/s
    prefill_per_token_pair_s=_pair_s(_H100_PREFILL),
    num_gpu_blocks=27_900,  # (80 GB x 0.9 - 16 GB - 2 GiB) / 2 MiB
    source="InferenceBench concurrency sweep, vLLM 0.21.0, H100-80GB-HBM3 (see comment)",
    calibration=(
        CalibrationPoint(1, 200, 256, ttft_s=0.01398, itl_s=0.00648),
        CalibrationPoint(4, 200, 256, output_tokens_per_s=580.3, itl_s=0.00659),
        CalibrationPoint(16, 200, 256, output_tokens_per_s=1384.2, itl_s=0.01094),
    ),
)

# A100 40GB (1.555 TB/s, 312 dense bf16 TFLOPS). Fitted to a published vLLM sweep,
# https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on (vLLM, Llama-3.1-8B-Instruct bf16,
# one A100 40GB, `vllm bench serve --random-input-len 1024 --random-output-len 128 --ignore-eos
# --max-concurrency C`): "decode at one request per time runs at about 75 tokens/sec" and
# "a 6.6x gain with almost no latency cost" at C=8 (6.6 x 75 = 495 tok/s). "Roughly 77% of the
# memory-bandwidth ceiling" (1555 GB/s / 16 GB = 97 tok/s) makes the 75 tok/s a decode rate, so
# it stands for both the C=1 output throughput and a TPOT of 1/75 s; "almost no latency cost"
# at C=8 is read as the same TPOT there. TTFT is not published.
_A100_PREFILL = 14_000.0
_A100_40GB = GpuProfile(
    name="a100-40gb",
    gpu_name="NVIDIA A100-SXM4-40GB",
    prefill_tokens_per_s=_A100_PREFILL,
    step_base_s=0.0122,
    step_per_seq_s=0.0001,
    step_per_kv_token_s=1.0e-7,  # 128 KiB per token at ~85% of 1.555 TB/s
    prefill_per_token_pair_s=_pair_s(_A100_PREFILL),
    num_gpu_blocks=9_000,  # (40 GB x 0.9 - 16 GB - 2 GiB) / 2 MiB
    source="johnmusgrave.com vLLM throughput-latency sweep on A100 40GB (see comment)",
    calibration=(
        CalibrationPoint(1, 1024, 128, output_tokens_per_s=75.0, itl_s=1 / 75),
        CalibrationPoint(8, 1024, 128, output_tokens_per_s=495.0, itl_s=1 / 75),
    ),
)

PROFILES: dict[str, GpuProfile] = {
    profile.name: profile
    for profile in (
        _H100,
        # A100 SXM4 80GB: same compute as the 40GB card, 2.039 TB/s of HBM2e instead of 1.555.
        _derive(
            _A100_40GB,
            name="a100",
            gpu_name="NVIDIA A100-SXM4-80GB",
            bandwidth_ratio=2039 / 1555,
            compute_ratio=1.0,
            num_gpu_blocks=27_900,
            note="A100 80GB SXM: 2039 vs 1555 GB/s, same 312 TFLOPS",
        ),
        _A100_40GB,
        # L40S 48GB: 864 GB/s GDDR6, 362 dense bf16 TFLOPS.
        _derive(
            _H100,
            name="l40s",
            gpu_name="NVIDIA L40S",
            bandwidth_ratio=864 / 3350,
            compute_ratio=362 / 989,
            num_gpu_blocks=11_500,
            note="L40S: 864 vs 3350 GB/s, 362 vs 989 TFLOPS",
        ),
        # A10 24GB: 600 GB/s, 125 dense bf16 TFLOPS; little room for KV after 16 GB of weights.
        _derive(
            _A100_40GB,
            name="a10",
            gpu_name="NVIDIA A10",
            bandwidth_ratio=600 / 1555,
            compute_ratio=125 / 312,
            num_gpu_blocks=1_300,
            max_num_seqs=128,
            note="A10: 600 vs 1555 GB/s, 125 vs 312 TFLOPS",
        ),
        # L4 24GB: 300 GB/s, 121 dense bf16 TFLOPS.
        _derive(
            _H100,
            name="l4",
            gpu_name="NVIDIA L4",
            bandwidth_ratio=300 / 3350,
            compute_ratio=121 / 989,
            num_gpu_blocks=1_300,
            max_num_seqs=128,
            note="L4: 300 vs 3350 GB/s, 121 vs 989 TFLOPS",
        ),
        # A100 80GB MIG 3g.40gb: 4 of 8 memory slices (half the bandwidth, 40 GB) and 3 of 7
        # compute slices.
        _derive(
            _A100_40GB,
            name="a100-mig-3g.40gb",
            gpu_name="NVIDIA A100-SXM4-80GB MIG 3g.40gb",
            bandwidth_ratio=(2039 / 2) / 1555,
            compute_ratio=3 / 7,
            num_gpu_blocks=9_000,
            note="MIG 3g.40gb of an A100 80GB: 1019 vs 1555 GB/s, 3/7 of the SMs",
        ),
        GpuProfile(
            name="instant",
            gpu_name="none (instant)",
            prefill_tokens_per_s=float("inf"),
            step_base_s=0.0,
            step_per_seq_s=0.0,
            num_gpu_blocks=65_536,
            instant=True,
        ),
    )
}


def get_profile(name: str) -> GpuProfile:
    """The profile called `name`; an unknown name raises ValueError listing the known ones."""
    try:
        return PROFILES[name.strip().lower()]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ValueError(f"unknown GPU profile {name!r}; expected one of: {known}") from None

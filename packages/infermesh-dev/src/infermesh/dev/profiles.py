"""GPU performance profiles for the engine model: how fast one emulated vLLM replica is.

Plain values only. The numbers are shaped after a dense ~8B model in bf16 on each card; they
are meant to make replicas differ the way real ones do, not to predict any real deployment.
"""

from __future__ import annotations

import attrs

__all__ = ["DEFAULT_MODEL", "PROFILES", "GpuProfile", "get_profile"]

DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
"""The model name an emulated replica serves unless told otherwise."""


@attrs.frozen
class GpuProfile:
    """Speed and memory of one emulated GPU.

    A decode step of a batch of `n` sequences takes `step_base_s + step_per_seq_s * n` seconds;
    prompt tokens computed in a step add `tokens / prefill_tokens_per_s`. `num_gpu_blocks` KV
    blocks of `block_size` tokens each fit in memory. `instant` profiles bypass the engine model.
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

    def __attrs_post_init__(self) -> None:
        if not self.instant and self.num_gpu_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"profile {self.name!r}: {self.num_gpu_blocks} blocks of {self.block_size} tokens "
                f"cannot hold one sequence of max_model_len={self.max_model_len}"
            )

    def step_s(self, num_seqs: int, prefill_tokens: int) -> float:
        """Duration of one engine step with `num_seqs` sequences and `prefill_tokens` to compute."""
        if self.instant:
            return 0.0
        return (
            self.step_base_s
            + self.step_per_seq_s * num_seqs
            + prefill_tokens / self.prefill_tokens_per_s
        )


PROFILES: dict[str, GpuProfile] = {
    profile.name: profile
    for profile in (
        GpuProfile(
            name="h100",
            gpu_name="NVIDIA H100 80GB HBM3",
            prefill_tokens_per_s=24_000.0,
            step_base_s=0.008,
            step_per_seq_s=0.00012,
            num_gpu_blocks=8192,
        ),
        GpuProfile(
            name="a100",
            gpu_name="NVIDIA A100-SXM4-80GB",
            prefill_tokens_per_s=12_000.0,
            step_base_s=0.013,
            step_per_seq_s=0.00022,
            num_gpu_blocks=4096,
        ),
        GpuProfile(
            name="a10",
            gpu_name="NVIDIA A10",
            prefill_tokens_per_s=3_500.0,
            step_base_s=0.028,
            step_per_seq_s=0.0006,
            num_gpu_blocks=1024,
            max_num_seqs=128,
        ),
        GpuProfile(
            name="l4",
            gpu_name="NVIDIA L4",
            prefill_tokens_per_s=2_500.0,
            step_base_s=0.036,
            step_per_seq_s=0.0008,
            num_gpu_blocks=768,
            max_num_seqs=128,
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

"""Fixtures for infermesh-dev tests: in-process emulators on 127.0.0.1 and quick test profiles."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from infermesh.dev.profiles import GpuProfile
from infermesh.dev.vllm_emulator import EmulatorServer

# A profile whose steps are long enough to watch tokens arrive one by one.
SLOW = GpuProfile(
    name="test-slow",
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.05,
    step_per_seq_s=0.0,
    num_gpu_blocks=1024,
    max_model_len=2048,
)
# A profile fast enough that tests do not wait on it.
FAST = GpuProfile(
    name="test-fast",
    gpu_name="test",
    prefill_tokens_per_s=1_000_000.0,
    step_base_s=0.001,
    step_per_seq_s=0.0,
    num_gpu_blocks=1024,
    max_model_len=2048,
)


@pytest.fixture
def slow_profile() -> GpuProfile:
    return SLOW


@pytest.fixture
def start(
    infermesh_start_vllm: Callable[..., Awaitable[EmulatorServer]],
) -> Callable[..., Awaitable[EmulatorServer]]:
    """Start emulators in this event loop: `await start(profile=..., loras=...)`; the pytest
    plugin's `infermesh_start_vllm` with the FAST profile by default (stopped after the test)."""

    async def _start(**options: object) -> EmulatorServer:
        options.setdefault("profile", FAST)
        return await infermesh_start_vllm(**options)

    return _start

"""The `vllm` plugin: registers the vLLM runtime adapter under kind "vllm".

Registration only; importing this module does no I/O and starts nothing.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterRuntimeAdapter, hookimpl
from infermesh.vllm.adapter import VllmAdapter


@hookimpl
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    register("vllm", VllmAdapter.from_context)

"""The `triton` plugin: registers the Triton runtime adapter and Triton's GPU metrics source.

Registration only; importing this module does no I/O and starts nothing. `[[runtimes]] kind =
"triton"` watches a Triton server (its targets use the `kserve-http` transport unless the table
sets one); `[[gpus]] kind = "triton"` reads the `nv_gpu_*` gauges of its metrics port.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterGpuAdapter, RegisterRuntimeAdapter, hookimpl
from infermesh.triton.adapter import TritonAdapter
from infermesh.triton.gpu import TritonGpuAdapter


@hookimpl
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    register("triton", TritonAdapter.from_context)


@hookimpl
def infermesh_register_gpu_adapters(register: RegisterGpuAdapter) -> None:
    register("triton", TritonGpuAdapter.from_context)

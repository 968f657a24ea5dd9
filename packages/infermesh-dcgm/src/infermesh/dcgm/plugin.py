"""The `dcgm` plugin: registers the dcgm-exporter and NVML GPU adapters.

Registration only; importing this module does no I/O and loads no NVML library. `[[gpus]]
kind = "dcgm"` polls dcgm-exporter (default http://127.0.0.1:9400/metrics); `[[gpus]] kind =
"nvml"` reads the local GPUs through NVIDIA's NVML (the `nvidia-ml-py` bindings).
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterGpuAdapter, hookimpl
from infermesh.dcgm.exporter import DcgmExporterAdapter
from infermesh.dcgm.nvml import NvmlAdapter


@hookimpl
def infermesh_register_gpu_adapters(register: RegisterGpuAdapter) -> None:
    register("dcgm", DcgmExporterAdapter.from_context)
    register("nvml", NvmlAdapter.from_context)

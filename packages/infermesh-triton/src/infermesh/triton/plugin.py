"""The `triton` plugin: registers the Triton runtime adapter under kind "triton".

Registration only; importing this module does no I/O and starts nothing. Targets of a
`[[runtimes]]` table of kind triton use the `kserve-http` transport unless the table sets one.
"""

from __future__ import annotations

from infermesh.core.hookspecs import RegisterRuntimeAdapter, hookimpl
from infermesh.triton.adapter import TritonAdapter


@hookimpl
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    register("triton", TritonAdapter.from_context)

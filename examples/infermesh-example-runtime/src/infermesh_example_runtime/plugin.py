"""Registers the runtime adapter of kind "llamacpp"; importing it does no I/O.

The adapter module (and aiohttp) is imported only when the agent builds an adapter, so loading
this plugin costs `infermesh --help` nothing.
"""

from __future__ import annotations

from infermesh.core import hookimpl
from infermesh.core.contracts import AdapterContext, RuntimeAdapter
from infermesh.core.hookspecs import RegisterRuntimeAdapter

KIND = "llamacpp"


def llamacpp_adapter(context: AdapterContext) -> RuntimeAdapter:
    """The factory of `[[runtimes]] kind = "llamacpp"`."""
    from infermesh_example_runtime.adapter import LlamaCppAdapter

    return LlamaCppAdapter(context)


@hookimpl
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    register(KIND, llamacpp_adapter)

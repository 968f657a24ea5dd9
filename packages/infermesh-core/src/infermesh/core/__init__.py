"""InferMesh core: the contract every InferMesh distribution and plugin builds on."""

from infermesh.core.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
__version__ = "0.1.0"

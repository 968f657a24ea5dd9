"""gRPC status helpers shared by the servicers: ending a call with a code and a message.

Only wraps grpc.aio's context; holds no state.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

__all__ = ["abort"]


async def abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with `code` and `message` (grpc.aio raises to unwind the handler)."""
    await context.abort(code, message)
    raise AssertionError("grpc.aio context.abort returned")  # pragma: no cover

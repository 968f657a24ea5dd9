"""Errors the router answers with, in OpenAI's error JSON shape.

`{"error": {"message", "type", "param", "code"}}` with the HTTP status and any extra headers
(`Retry-After`, `Allow`). Values only: this module never does I/O.
"""

from __future__ import annotations

import math

import orjson

__all__ = [
    "ApiError",
    "bad_request",
    "error_body",
    "error_json",
]

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


def error_json(
    message: str, error_type: str, param: str | None, code: str | None
) -> dict[str, object]:
    """The `{"error": ...}` object OpenAI clients parse."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps(error_json(message, error_type, param, code))


class ApiError(Exception):
    """A request the router answers itself with an OpenAI-style error.

    Raised by request parsing and routing; the ASGI app turns it into a response.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        allow: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s
        self.allow = allow

    def body(self) -> bytes:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Extra response headers: `Retry-After` in whole seconds (at least 1), `Allow`."""
        extra: list[tuple[bytes, bytes]] = []
        if self.retry_after_s is not None:
            seconds = max(1, math.ceil(self.retry_after_s))
            extra.append((b"retry-after", str(seconds).encode()))
        if self.allow is not None:
            extra.append((b"allow", self.allow.encode()))
        return extra


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 `invalid_request_error`, for malformed or wrong-typed input."""
    return ApiError(400, message, param=param, code=code)

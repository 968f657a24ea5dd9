"""Exit codes of the operator CLI and the error that carries one: every failure a user can meet
becomes a `CtlError`, printed as one line, never a traceback. Imports nothing heavy (no gRPC).
"""

from __future__ import annotations

import enum

__all__ = ["CtlError", "ExitCode"]


class ExitCode(enum.IntEnum):
    """The CLI's exit statuses (docs/cli.md lists them)."""

    OK = 0
    FAILED = 1
    """The agent answered that the operation failed (no leader, an internal error)."""
    USAGE = 2
    """Bad flags or input: an unreadable or invalid file, an argument the agent rejected."""
    NOT_FOUND = 3
    """The node, model or policy entry does not exist."""
    REFUSED = 4
    """The agent refused the caller: certificate, TLS trust or role."""
    UNREACHABLE = 5
    """No agent answered at the endpoint in time."""


class CtlError(Exception):
    """An error to print as one line (no traceback) and leave with `exit_code`."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

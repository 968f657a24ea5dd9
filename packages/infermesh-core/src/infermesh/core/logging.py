"""structlog set-up shared by every InferMesh process: JSON when not on a TTY, pretty on one.

Every line carries the node id; data-path code binds `request_id` with contextvars.
Never configures logging as a side effect of import: call `configure_logging` once at start-up.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    node: str = "",
    component: str = "",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the stdlib root logger.

    `fmt` is `auto` (console renderer on a TTY, JSON otherwise), `json` or `console`.
    """
    out = stream if stream is not None else sys.stderr
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(_LEVELS)}")
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r}; expected auto, json or console")
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    bound: dict[str, str] = {}
    if node:
        bound["node"] = node
    if component:
        bound["component"] = component
    structlog.contextvars.bind_contextvars(**bound)
    logging.basicConfig(level=_LEVELS[level.lower()], stream=out, force=True,
                        format="%(levelname)s %(name)s: %(message)s")


def get_logger(name: str) -> Any:
    """A structlog logger bound with the module name."""
    return structlog.get_logger(logger=name)

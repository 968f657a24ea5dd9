"""structlog set-up shared by every InferMesh process: JSON when not on a TTY, pretty on one.

Every line carries the node id and component; data-path code binds `request_id` with
`structlog.contextvars`. Standard-library loggers (grpc, uvicorn, asyncio) render the same way.
Never configures logging as a side effect of import: call `configure_logging` once at start-up.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import FilteringBoundLogger

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "configure_logging", "get_logger"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
LOG_LEVELS: tuple[str, ...] = tuple(_LEVELS)
LOG_FORMATS: tuple[str, ...] = ("auto", "json", "console")


class _InfermeshHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the root handler this module installed, so reconfiguring replaces only it."""


class _NamedPrintLogger(structlog.PrintLogger):
    """A PrintLogger that knows its name, so `add_logger_name` can put it on every line."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _NamedPrintLoggerFactory:
    def __init__(self, file: TextIO) -> None:
        self._file = file

    def __call__(self, *args: Any) -> _NamedPrintLogger:
        return _NamedPrintLogger(self._file, str(args[0]) if args else "")


def _static_fields(fields: dict[str, str]) -> Any:
    def add(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def configure_logging(
    level: str = "info",
    fmt: str = "auto",
    node: str = "",
    component: str = "",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard-library root logger to write to `stream`.

    `level` is one of LOG_LEVELS (any case); `fmt` is `auto` (console renderer on a TTY, JSON
    otherwise), `json` or `console`. `node` and `component` are added to every line (they are
    not context variables, so clearing the context keeps them). Raises ValueError naming the
    accepted values for a bad level or format.
    """
    out = stream if stream is not None else sys.stderr
    if level.lower() not in _LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(LOG_FORMATS)}")
    numeric_level = _LEVELS[level.lower()]
    is_tty = hasattr(out, "isatty") and out.isatty()
    use_json = fmt == "json" or (fmt == "auto" and not is_tty)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=is_tty)
    )
    fields = {key: value for key, value in (("node", node), ("component", component)) if value}
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _static_fields(fields),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            structlog.stdlib.add_logger_name,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=_NamedPrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    handler = _InfermeshHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _InfermeshHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger whose lines carry `name` (key `logger`) once logging is configured.

    Safe at import time: the logger picks up the configuration current when it first logs.
    """
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger

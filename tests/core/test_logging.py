"""Logging: JSON lines carrying node and component when not on a TTY; bad settings fail clearly."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from infermesh.core.logging import configure_logging, get_logger

pytestmark = pytest.mark.usefixtures("reset_logging")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_node_component_logger_and_fields_when_not_on_a_tty() -> None:
    out = io.StringIO()
    configure_logging("info", "auto", node="gpu-node-1", component="agent", stream=out)
    get_logger("infermesh.agent.state").info("target added", target="llama@node-a")
    (line,) = lines(out)
    assert line["event"] == "target added"
    assert line["node"] == "gpu-node-1"
    assert line["component"] == "agent"
    assert line["logger"] == "infermesh.agent.state"
    assert line["level"] == "info"
    assert line["target"] == "llama@node-a"
    assert isinstance(line["timestamp"], str)


def test_a_logger_created_before_configuration_follows_it() -> None:
    log = get_logger("infermesh.early")  # module-level loggers are created at import time
    out = io.StringIO()
    configure_logging("info", "json", node="n1", stream=out)
    log.warning("late")
    assert lines(out)[0]["node"] == "n1"


def test_node_survives_clearing_request_context() -> None:
    out = io.StringIO()
    configure_logging("info", "json", node="n1", component="router", stream=out)
    structlog.contextvars.bind_contextvars(request_id="req-1")
    get_logger("x").info("with request")
    structlog.contextvars.clear_contextvars()
    get_logger("x").info("after request")
    first, second = lines(out)
    assert first["request_id"] == "req-1"
    assert "request_id" not in second
    assert second["node"] == "n1"
    assert second["component"] == "router"


def test_standard_library_loggers_are_rendered_as_json_too() -> None:
    out = io.StringIO()
    configure_logging("info", "json", node="n1", component="agent", stream=out)
    logging.getLogger("grpc.some.module").warning("channel %s closed", "c1")
    (line,) = lines(out)
    assert line["event"] == "channel c1 closed"
    assert line["logger"] == "grpc.some.module"
    assert line["node"] == "n1"


def test_level_filters_lower_levels() -> None:
    out = io.StringIO()
    configure_logging("WARNING", "json", stream=out)
    log = get_logger("x")
    log.info("hidden")
    log.warning("shown")
    logging.getLogger("lib").info("hidden too")
    assert [line["event"] for line in lines(out)] == ["shown"]


def test_console_format_on_a_tty_is_not_json() -> None:
    out = FakeTty()
    configure_logging("info", "auto", node="n1", stream=out)
    get_logger("x").info("hello", answer=42)
    text = out.getvalue()
    assert "hello" in text
    assert "answer" in text
    assert not text.lstrip().startswith("{")


def test_reconfiguring_replaces_the_previous_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    logging.getLogger("lib").warning("once")
    assert first.getvalue() == ""
    assert [line["event"] for line in lines(second)] == ["once"]


def test_invalid_level_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown log level 'loud'; expected one of debug, info, warning, error, critical",
    ):
        configure_logging("loud")


def test_invalid_format_is_a_clear_error() -> None:
    with pytest.raises(
        ValueError, match=r"unknown log format 'xml'; expected one of auto, json, console"
    ):
        configure_logging("info", "xml")


def test_stdlib_exception_logs_carry_the_traceback_in_json() -> None:
    out = io.StringIO()
    configure_logging("info", "json", node="n1", component="router", stream=out)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    (line,) = lines(out)
    assert line["logger"] == "uvicorn.error"
    assert "Traceback (most recent call last)" in str(line["exception"])
    assert "ZeroDivisionError: division by zero" in str(line["exception"])

"""Shared pytest fixtures: async tests run on asyncio (through anyio) in debug mode, and a test
whose code blocks the event loop fails.

asyncio's debug mode logs every callback that runs longer than the loop's
`slow_callback_duration` ("Executing <Handle ...> took 0.712 seconds"). The detector collects
those records and fails the test when one exceeds BLOCKED_LOOP_S (1 s). The threshold is
generous on purpose: on a loaded 2-core machine a first `openai.AsyncOpenAI()` (lazy imports,
TLS context) already takes ~0.6 s, and a normal test must not fail for that. It still catches a
`time.sleep`, a synchronous HTTP call or a subprocess run on the loop. Override it with the
`INFERMESH_BLOCKED_LOOP_S` environment variable, or opt a test out with
`@pytest.mark.allow_blocking`. Only loops started through anyio's pytest plugin (tests marked
`@pytest.mark.anyio`) run in debug mode; subprocesses are unaffected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterator

import pytest
import structlog

pytest_plugins = ["pytester"]

BLOCKED_LOOP_S = float(os.environ.get("INFERMESH_BLOCKED_LOOP_S", "1.0"))
ALLOW_BLOCKING_MARKER = "allow_blocking"
NOT_OURS = ("AioServer._server_main_loop",)
"""Callbacks whose work is a library's own, not ours: grpc.aio's server loop polls its C
completion queue in one step, which on a loaded 2-core machine was once measured at 1.1 s
(nothing of ours runs in it: our handlers run in their own tasks, which stay watched)."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{ALLOW_BLOCKING_MARKER}: do not fail this test when a callback blocks the event loop",
    )


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return "asyncio", {"debug": True}


class BlockedLoopDetector(logging.Handler):
    """Collects asyncio's debug-mode reports of callbacks that blocked the loop too long."""

    def __init__(self, threshold_s: float) -> None:
        super().__init__(level=logging.WARNING)
        self.threshold_s = threshold_s
        self.blocked: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        # asyncio.base_events: logger.warning('Executing %s took %.3f seconds', handle, dt)
        if record.msg != "Executing %s took %.3f seconds" or not isinstance(record.args, tuple):
            return
        handle, duration_s = record.args
        if any(owner in str(handle) for owner in NOT_OURS):
            return
        if isinstance(duration_s, float) and duration_s >= self.threshold_s:
            self.blocked.append((str(handle), duration_s))

    def report(self) -> str:
        lines = [f"  {duration_s:.3f} s in {handle}" for handle, duration_s in self.blocked]
        return (
            f"the event loop was blocked for more than {self.threshold_s} s "
            "(blocking I/O or heavy work on the loop? use anyio.to_thread.run_sync, or mark "
            f"the test @pytest.mark.{ALLOW_BLOCKING_MARKER}):\n" + "\n".join(lines)
        )

    def __enter__(self) -> BlockedLoopDetector:
        logger = logging.getLogger("asyncio")
        self._saved_level = logger.level
        # A test that configures logging (root level ERROR, say) must not hide the reports.
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        logger = logging.getLogger("asyncio")
        logger.removeHandler(self)
        logger.setLevel(self._saved_level)


def _enforced(item: pytest.Item) -> bool:
    return item.get_closest_marker(ALLOW_BLOCKING_MARKER) is None


@pytest.fixture(autouse=True)
def blocked_loop_detector(request: pytest.FixtureRequest) -> Iterator[BlockedLoopDetector]:
    """Watches the whole test, async fixtures included, for callbacks that block the loop."""
    with BlockedLoopDetector(BLOCKED_LOOP_S) as detector:
        yield detector
    # Blocks in the test body fail the test itself (pytest_runtest_call below); what is left
    # here happened in fixture set-up or teardown.
    if detector.blocked and _enforced(request.node):
        pytest.fail(detector.report(), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    yield
    funcargs = getattr(item, "funcargs", {})
    detector = funcargs.get("blocked_loop_detector")
    if isinstance(detector, BlockedLoopDetector) and detector.blocked and _enforced(item):
        report = detector.report()
        detector.blocked.clear()
        pytest.fail(report, pytrace=False)


@pytest.fixture(autouse=True)
def reset_logging() -> Iterator[None]:
    """Undo configure_logging after every test: a test that sets a level (or a CLI run
    in-process) must not filter what the next test captures."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = handlers
    root.setLevel(level)

"""The suite-wide blocked-event-loop detector (tests/conftest.py) fails tests that block."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUITE = """
import time

import anyio
import pytest


@pytest.mark.anyio
async def test_blocks_the_loop() -> None:
    time.sleep(0.5)  # blocking on purpose: what the detector must catch
    await anyio.sleep(0)


@pytest.mark.anyio
@pytest.mark.allow_blocking
async def test_blocks_but_opted_out() -> None:
    time.sleep(0.5)
    await anyio.sleep(0)


@pytest.mark.anyio
async def test_offloads_blocking_work_to_a_thread() -> None:
    await anyio.to_thread.run_sync(time.sleep, 0.5)


@pytest.mark.anyio
async def test_yields_often() -> None:
    for _ in range(5):
        await anyio.sleep(0.01)
"""


# The inner run logs to the same asyncio logger this test's own detector watches.
@pytest.mark.allow_blocking
def test_a_test_that_blocks_the_event_loop_fails_unless_marked(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_BLOCKED_LOOP_S", "0.3")  # keeps this test short
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_blocking=SUITE)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--timeout=60")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*test_blocks_the_loop*",
            "*the event loop was blocked for more than 0.3 s*",
            "*s in <Task*",
        ]
    )
    assert "test_blocks_but_opted_out FAILED" not in result.stdout.str()

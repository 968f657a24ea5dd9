"""The `infermesh` pytest plugin: its fixtures work in a plugin author's test run, the fake
clock drives a real adapter, and loading the plugin imports nothing of InferMesh."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import anyio
import pytest

from infermesh.core.contracts import AdapterContext
from infermesh.dev.fake_clock import DEFAULT_START, FakeClock
from infermesh.dev.profiles import DEFAULT_MODEL
from infermesh.dev.vllm_emulator import EmulatorServer
from infermesh.vllm.adapter import VllmAdapter

AUTHOR_TESTS = """
import aiohttp
import pytest

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_clock_moves_only_when_told(infermesh_clock):
    assert infermesh_clock() == infermesh_clock()
    infermesh_clock.advance(2.5)
    assert infermesh_clock() == 1_700_000_002.5


async def test_emulated_vllm_answers_openai_requests(infermesh_start_vllm):
    server = await infermesh_start_vllm(model="acme/tiny", profile="h100")
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["acme/tiny"]
"""


def test_fake_clock_steps_and_advances_and_refuses_to_run_backwards() -> None:
    clock = FakeClock(step_s=10.0)
    assert [clock(), clock()] == [DEFAULT_START, DEFAULT_START + 10.0]
    assert clock.advance(5.0) == DEFAULT_START + 25.0
    assert clock.readings == 2
    with pytest.raises(ValueError, match="cannot advance a clock by -1 s"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="step_s must be >= 0"):
        FakeClock(step_s=-1.0)


@pytest.mark.anyio
async def test_the_fake_clock_stamps_what_a_real_adapter_reads_from_the_emulated_vllm(
    infermesh_vllm: EmulatorServer, infermesh_clock: FakeClock
) -> None:
    context = AdapterContext(node="n1", name="rt", url=infermesh_vllm.url, poll_interval_s=0.05)
    adapter = VllmAdapter(context, clock=infermesh_clock, environ={})
    try:
        with anyio.fail_after(20):
            async for delta in adapter.deltas():
                first = delta
                break
    finally:
        await adapter.aclose()
    assert (first.key.endpoint, first.key.model) == (infermesh_vllm.url, DEFAULT_MODEL)
    assert first.changes["last_updated"] == DEFAULT_START
    assert adapter.states[first.key].healthy


def test_a_plugin_authors_tests_get_the_fixtures_from_the_entry_point(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_author=textwrap.dedent(AUTHOR_TESTS))
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=2)


def test_loading_the_plugin_imports_no_infermesh_module() -> None:
    code = (
        "import sys, infermesh.dev.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith('infermesh') "
        "and m != 'infermesh.dev.pytest_plugin'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "['infermesh', 'infermesh.dev']"

"""The agent's replica GPU discovery: the finder's answers reach each runtime's assigner, a runtime
that cannot be mapped keeps its last GPUs with the reason logged once, and a broken finder does
not stop the agent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import structlog.testing

from infermesh.agent.gpu_discovery import DiscoveredRuntime, discover_once, replica_gpu_finder
from infermesh.core.scoring.gpu_map import GpuAssigner, ReplicaGpuFinder, ReplicaGpus
from infermesh.core.scoring.state import StateStore

pytestmark = pytest.mark.anyio

URL = "http://127.0.0.1:8000"


class Finder:
    """Answers what the test put in `answers` (or raises `error`)."""

    def __init__(self, interval_s: float = 30.0) -> None:
        self.replica_discovery_interval_s = interval_s
        self.answers: dict[str, ReplicaGpus] = {}
        self.error: Exception | None = None

    async def replica_gpus(self, urls: Sequence[str]) -> Mapping[str, ReplicaGpus]:
        if self.error is not None:
            raise self.error
        return {url: self.answers[url] for url in urls if url in self.answers}


def runtime() -> DiscoveredRuntime:
    return DiscoveredRuntime("vllm-0", URL, GpuAssigner("", StateStore().get_model))


def test_only_a_finder_with_a_nonzero_interval_is_used() -> None:
    finder, off = Finder(), Finder(interval_s=0)
    assert isinstance(finder, ReplicaGpuFinder)
    assert replica_gpu_finder([("dcgm-0", object()), ("nvml-0", finder)]) is finder
    assert replica_gpu_finder([("nvml-0", off)]) is None


async def test_found_gpus_reach_the_assigner_and_a_miss_keeps_them() -> None:
    finder, target = Finder(), runtime()
    finder.answers[URL] = ReplicaGpus(gpus=("GPU-1", "GPU-0"), pids=(42,))
    with structlog.testing.capture_logs() as logs:
        await discover_once(finder, [target])
        await discover_once(finder, [target])
    assert target.assigner.discovered == "GPU-1,GPU-0"
    assert [e["gpus"] for e in logs if e["event"] == "runtime GPUs discovered"] == ["GPU-1,GPU-0"]
    finder.answers[URL] = ReplicaGpus(reason="nothing on this machine listens on 127.0.0.1:8000")
    with structlog.testing.capture_logs() as logs:
        await discover_once(finder, [target])
        await discover_once(finder, [target])
    assert target.assigner.discovered == "GPU-1,GPU-0"  # the last mapping holds
    said = [e for e in logs if e["event"] == "runtime GPUs not discovered"]
    assert [(e["reason"], e["keeping"]) for e in said] == [
        ("nothing on this machine listens on 127.0.0.1:8000", "GPU-1,GPU-0")
    ]


async def test_a_failing_finder_is_logged_and_changes_nothing() -> None:
    finder, target = Finder(), runtime()
    finder.error = RuntimeError("driver gone")
    with structlog.testing.capture_logs() as logs:
        await discover_once(finder, [target])
    assert target.assigner.discovered == ""
    assert [e["error"] for e in logs if e["event"] == "replica GPU discovery failed"] == [
        "RuntimeError: driver gone"
    ]
    finder.error = None  # no answer for the URL at all
    with structlog.testing.capture_logs() as logs:
        await discover_once(finder, [target])
    assert [e["reason"] for e in logs if e["event"] == "runtime GPUs not discovered"] == [
        "the GPU adapter gave no answer"
    ]

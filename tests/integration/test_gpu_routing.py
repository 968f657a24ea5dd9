"""GPU-aware routing with real processes: two emulated vLLM replicas, each on its own GPU of an
emulated dcgm-exporter (`[[gpus]] kind = "dcgm"`, `[[runtimes]] gpus = [...]`), behind the
agent and router.

- A GPU throttled in the emulated fleet (its replica also slows down through `/dev/speed`) gets
  a smaller share of new requests once the agent has scraped it, and its share comes back when
  it recovers. Shares are compared, never timings.
- An XID on a GPU removes its replica from the candidates, with the reason in `ScoreTargets`.

Prefix affinity is switched off (`[scoring.weights] prefix = 0`): every prompt here differs,
and prefix placement would otherwise pin half of them to each replica whatever the GPUs say.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import grpc
import openai
import pytest

from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc
from infermesh.dev.dcgm_emulator import DcgmEmulator, DcgmEmulatorConfig, start_dcgm_emulator
from infermesh.dev.dcgm_fleet import DcgmFleetConfig
from infermesh.dev.harness import LocalMesh, ReplicaSpec, free_port
from infermesh.dev.loadgen import replica_tag_of

from .conftest import MODEL, spec, wait_for

pytestmark = pytest.mark.anyio

WAVE = 16
"""Requests sent together: the router spreads them by the in-flight reservations."""
WAVES = 3
SLOW_FACTOR = 0.25
NODE = "gpu-node"


class GpuMesh:
    """The running mesh, the emulated exporter and each replica's GPU."""

    def __init__(self, mesh: LocalMesh, dcgm: DcgmEmulator, gpu_of: dict[str, str]) -> None:
        self.mesh = mesh
        self.dcgm = dcgm
        self.gpu_of = gpu_of

    async def control(self, replica: str, body: dict[str, object]) -> None:
        url = self.dcgm.control_url(self.gpu_of[replica])
        async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert all(update["status"] == 200 for update in answer["speed_updates"]), answer

    async def score(self) -> scoring_pb2.ScoreTargetsResponse:
        async with grpc.aio.insecure_channel(f"unix://{self.mesh.socket_path}") as channel:
            request = scoring_pb2.ScoreTargetsRequest(
                request=scoring_pb2.RequestFeatures(model=MODEL)
            )
            reply: scoring_pb2.ScoreTargetsResponse = await scoring_pb2_grpc.ScoringStub(
                channel
            ).ScoreTargets(request)
            return reply

    async def gpu_reasons(self) -> dict[str, str]:
        """Replica name -> its `gpu_health` reason in the agent's ranking."""
        reply = await self.score()
        by_url = {replica.url: replica.name for replica in self.mesh.replicas}
        return {
            by_url[target.key.endpoint]: reason.reason
            for target in reply.targets
            for reason in target.reasons
            if reason.scorer == "gpu_health"
        }

    async def share_of(self, replica: str) -> float:
        """The fraction of WAVES x WAVE new chat requests that `replica` served."""
        served: Counter[str] = Counter()
        async with openai.AsyncOpenAI(
            base_url=f"{self.mesh.router_url}/v1", api_key="unused", max_retries=0
        ) as oai:

            async def one(i: int) -> str:
                reply = await oai.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"question {i}"}],
                    max_tokens=16,
                )
                return replica_tag_of(reply.id)

            for wave in range(WAVES):
                served.update(await asyncio.gather(*(one(wave * WAVE + i) for i in range(WAVE))))
        assert sum(served.values()) == WAVES * WAVE
        return served[replica] / (WAVES * WAVE)


@pytest.fixture(scope="module")
async def gpu_mesh() -> AsyncIterator[GpuMesh]:
    ports = {"a": free_port(), "b": free_port()}
    uuids = {
        "a": "GPU-00000000-0000-4000-8000-00000000000a",
        "b": "GPU-00000000-0000-4000-8000-00000000000b",
    }
    dcgm = await start_dcgm_emulator(
        DcgmEmulatorConfig(
            fleet=DcgmFleetConfig(gpus=2, hostname=NODE, uuids=(uuids["a"], uuids["b"])),
            replicas={uuids[name]: (f"http://127.0.0.1:{port}",) for name, port in ports.items()},
        )
    )
    extra = "\n".join(
        [
            "[[gpus]]",
            'kind = "dcgm"',
            f'url = "{dcgm.metrics_url}"',
            "poll_interval_s = 0.2",
            "",
            "[scoring.weights]",
            "prefix = 0",
        ]
    )
    replicas = [
        ReplicaSpec("h100", name, port=port, gpus=(uuids[name],)) for name, port in ports.items()
    ]
    try:
        async with LocalMesh(spec(*replicas, node_id=NODE, extra_config=extra)) as mesh:
            running = GpuMesh(mesh, dcgm, uuids)

            async def gpus_seen() -> bool:
                reasons = await running.gpu_reasons()
                return all(f"GPU {uuids[n]} ok" == reasons.get(n) for n in ("a", "b"))

            await wait_for(
                gpus_seen, "the agent to score both replicas on healthy GPUs", timeout_s=60.0
            )
            yield running
    finally:
        await dcgm.aclose()


async def test_a_throttled_gpu_gets_less_new_traffic_until_it_recovers(
    gpu_mesh: GpuMesh,
) -> None:
    before = await gpu_mesh.share_of("a")

    await gpu_mesh.control(
        "a", {"state": "throttle", "reasons": ["hw_slowdown"], "factor": SLOW_FACTOR}
    )

    async def throttle_seen() -> bool:
        return "throttled hw_slowdown" in (await gpu_mesh.gpu_reasons()).get("a", "")

    await wait_for(throttle_seen, "the agent to score replica a's GPU as throttled")
    throttled = await gpu_mesh.share_of("a")

    await gpu_mesh.control("a", {"state": "recover"})

    async def recovery_seen() -> bool:
        return (await gpu_mesh.gpu_reasons()).get("a", "").endswith(" ok")

    await wait_for(recovery_seen, "the agent to score replica a's GPU as ok again")
    recovered = await gpu_mesh.share_of("a")

    shares = (
        f"share of a: before {before:.2f}, throttled {throttled:.2f}, recovered {recovered:.2f}"
    )
    assert throttled < before, shares
    assert recovered > throttled, shares


async def test_an_xid_removes_the_replica_with_the_reason_in_score_targets(
    gpu_mesh: GpuMesh,
) -> None:
    uuid = gpu_mesh.gpu_of["b"]
    endpoint_b = next(r.url for r in gpu_mesh.mesh.replicas if r.name == "b")
    await gpu_mesh.control("b", {"state": "xid", "xid": 79})

    async def excluded() -> bool:
        reply = await gpu_mesh.score()
        return any(f"GPU {uuid} unhealthy: XID 79 reported" in why for why in reply.excluded)

    await wait_for(excluded, "ScoreTargets to exclude replica b for XID 79")
    reply = await gpu_mesh.score()
    assert [t.key.endpoint for t in reply.targets if t.key.endpoint == endpoint_b] == []
    assert reply.candidates == 2
    # New requests all go to a while b's GPU is faulty.
    assert await gpu_mesh.share_of("a") == 1.0
    # The agent's metrics say so too, with the reason.
    async with (
        aiohttp.ClientSession() as session,
        session.get(gpu_mesh.mesh.agent_metrics_url) as response,
    ):
        page = await response.text()
    flagged = [
        line
        for line in page.splitlines()
        if line.startswith("infermesh_agent_target_gpu_excluded{")
        and f'endpoint="{endpoint_b}"' in line
    ]
    assert len(flagged) == 1
    assert f'reason="GPU {uuid} unhealthy: XID 79 reported"' in flagged[0]
    assert flagged[0].endswith(" 1.0")

    await gpu_mesh.control("b", {"state": "recover"})

    async def back() -> bool:
        return len((await gpu_mesh.score()).targets) == 2

    await wait_for(back, "replica b to come back once its GPU recovers")

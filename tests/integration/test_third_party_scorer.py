"""A third-party scorer in its own distribution is found through entry points and reranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import openai
import pytest

from infermesh.core.proto import scoring_pb2, scoring_pb2_grpc
from infermesh.dev.harness import LocalMesh, ReplicaSpec, free_port
from infermesh.dev.loadgen import replica_tag_of
from infermesh.dev.pytest_plugin import StartMesh

from .conftest import MODEL

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

EXAMPLE_SRC = (
    Path(__file__).resolve().parents[2]
    / "examples"
    / "infermesh-example-scorer"
    / "src"
    / "infermesh_example_scorer"
)
WEIGHT = 10.0


def install_example_plugin(site: Path) -> None:
    """Lay the example distribution out as pip would: its package plus a dist-info with the
    `infermesh` entry point. Only processes with `site` on their path see it."""
    shutil.copytree(EXAMPLE_SRC, site / "infermesh_example_scorer")
    dist_info = site / "infermesh_example_scorer-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: infermesh-example-scorer\nVersion: 0.1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[infermesh]\nexample-scorer = infermesh_example_scorer.plugin\n"
    )


@pytest.fixture
async def plugin_mesh(tmp_path: Path, infermesh_start_router: StartMesh) -> LocalMesh:
    """Two replicas behind an agent and router whose processes see the example plugin."""
    site = tmp_path / "site"
    site.mkdir()
    install_example_plugin(site)
    preferred_port = free_port()
    return await infermesh_start_router(
        ReplicaSpec("h100", "plain"),
        ReplicaSpec("h100", "preferred", port=preferred_port),
        model=MODEL,
        extra_config=f'[scoring.weights]\n"preferred-endpoint" = {WEIGHT}',
        env=(("INFERMESH_PREFERRED_ENDPOINTS", f"http://127.0.0.1:{preferred_port}"),),
        plugin_paths=[site],
    )


def baseline_total(target: scoring_pb2.RankedTarget) -> float:
    """The weighted score this target would have without the third-party scorer."""
    reasons = [r for r in target.reasons if r.scorer != "preferred-endpoint"]
    return sum(r.score * r.weight for r in reasons) / sum(r.weight for r in reasons)


async def test_third_party_scorer_changes_the_ranking(plugin_mesh: LocalMesh) -> None:
    preferred = plugin_mesh.replicas[1].url
    changed = 0
    async with grpc.aio.insecure_channel(f"unix://{plugin_mesh.socket_path}") as channel:
        scoring = scoring_pb2_grpc.ScoringStub(channel)
        for prefix_key in range(1, 17):
            reply = await scoring.ScoreTargets(
                scoring_pb2.ScoreTargetsRequest(
                    request=scoring_pb2.RequestFeatures(model=MODEL, prefix_key=prefix_key)
                )
            )
            top = reply.targets[0]
            assert top.key.endpoint == preferred
            assert any(
                r.scorer == "preferred-endpoint" and r.weight == WEIGHT and r.score == 1.0
                for r in top.reasons
            )
            others = [baseline_total(t) for t in reply.targets if t.key.endpoint != preferred]
            changed += baseline_total(top) <= max(others)
    # Without the plugin the preferred replica would not have been strictly first: the built-in
    # scorers rate these idle replicas alike (a new prefix is neutral) or favour another one.
    assert changed > 0

    async with openai.AsyncOpenAI(
        base_url=f"{plugin_mesh.router_url}/v1", api_key="unused", max_retries=0
    ) as oai:
        for i in range(6):
            reply = await oai.chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": f"prefix {i}"},
                    {"role": "user", "content": "hi"},
                ],
                max_tokens=2,
            )
            assert replica_tag_of(reply.id) == "preferred"

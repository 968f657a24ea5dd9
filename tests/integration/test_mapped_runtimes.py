"""A mapped runtime (kind sglang) in a real mesh: the agent process reads its recorded pages, the
router sends OpenAI requests for its model to it, and an unreadable page takes it out."""

from __future__ import annotations

import openai
import pytest

from infermesh.dev.harness import LocalMesh, ReplicaSpec
from tests.agent.generic.pages import body, page
from tests.agent.generic.server import recorded_runtime
from tests.integration.conftest import agent_gauge, spec, wait_for

pytestmark = pytest.mark.anyio

SGLANG_MODEL = "Qwen/Qwen2.5-7B-Instruct"


async def test_an_sglang_runtime_is_scraped_by_the_agent_and_routed_to_by_the_router() -> None:
    routes: dict[str, tuple[int, bytes | str]] = {
        "/metrics": (200, page("sglang-1.prom")),
        "/v1/models": (200, body("sglang-models.json")),
        "/health": (200, b""),
    }
    async with recorded_runtime(routes) as sglang:
        extra = f'[[runtimes]]\nkind = "sglang"\nname = "sg"\nurl = "{sglang.url}"\n'
        extra += "poll_interval_s = 0.2\n"
        async with LocalMesh(spec(ReplicaSpec("instant", "v0"), extra_config=extra)) as mesh:

            async def kv_usage_is_read() -> bool:
                usage = await agent_gauge(
                    mesh, "infermesh_agent_target_kv_cache_usage_ratio", sglang.url
                )
                return usage == pytest.approx(0.61)

            await wait_for(kv_usage_is_read, "the agent to read sglang:token_usage")
            assert await agent_gauge(mesh, "infermesh_agent_target_running", sglang.url) == 7
            client = openai.AsyncOpenAI(
                base_url=f"{mesh.router_url}/v1", api_key="unused", max_retries=0
            )

            async def model_listed() -> bool:
                listed = await client.models.list()
                return SGLANG_MODEL in {model.id for model in listed.data}

            await wait_for(model_listed, "the router to list the SGLang model")
            answer = await client.chat.completions.create(
                model=SGLANG_MODEL, messages=[{"role": "user", "content": "hi"}]
            )
            sglang.routes["/metrics"] = (200, "<html>502 Bad Gateway</html>")
            refusals: list[openai.APIStatusError] = []

            async def no_longer_routed() -> bool:
                try:
                    await client.chat.completions.create(
                        model=SGLANG_MODEL, messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.APIStatusError as refused:
                    refusals.append(refused)
                    return True
                return False

            await wait_for(no_longer_routed, "the unreadable runtime to leave the candidates")
            await client.close()
    assert refusals[0].status_code == 503
    assert "not a Prometheus text page" in refusals[0].message  # the agent's reason, as given
    assert answer.choices[0].message.content == sglang.reply
    assert "/v1/chat/completions" in [path for path, _ in sglang.requests]

"""vLLM pages of every naming era, engine layout and LoRA set-up read to the right ModelState."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from infermesh.core.model import ModelState, TargetKey
from infermesh.vllm.parse import (
    ParsedScrape,
    VllmPageError,
    parse_scrape,
    read_metrics,
    read_models,
)
from tests.vllm.pages import MODEL, TWO_ENGINES, EngineLoad, models_json, render_page

DATA = Path(__file__).parent / "data"
NODE = "gpu-node-1"
ENDPOINT = "http://10.0.0.7:8000"
KEY = TargetKey(model=MODEL, node=NODE, endpoint=ENDPOINT)


def scrape(
    page: str,
    models: str | None = None,
    *,
    health: int = 200,
    previous: ParsedScrape | None = None,
    now: float = 1000.0,
) -> ParsedScrape:
    return parse_scrape(
        metrics_text=page,
        models_json=models if models is not None else models_json(),
        health_status=health,
        previous=previous.snapshot if previous else None,
        now=now,
        node=NODE,
        endpoint=ENDPOINT,
    )


def recorded(name: str) -> str:
    return (DATA / name).read_text()


ERA_PAGES = [
    "vllm-0.8-old-names.prom",
    "vllm-0.10-both-names.prom",
    "vllm-0.11-itl-renamed.prom",
    "vllm-0.13.prom",
    "vllm-0.13-underscores.prom",
    "vllm-0.13-two-engines.prom",
]


@pytest.mark.parametrize("page", ERA_PAGES)
def test_a_page_from_each_naming_era_parses_to_the_same_state(page: str) -> None:
    states = scrape(recorded(page), recorded("models.json")).states
    reference = scrape(recorded("vllm-0.13.prom"), recorded("models.json")).states
    assert states == reference
    assert states[KEY] == ModelState(
        key=KEY,
        labels=states[KEY].labels,
        running=3.0,
        waiting=2.0,
        kv_cache_usage=0.375,
        prefix_cache_hit_rate=0.25,
        ttft_s=(0.125 + 0.25 + 0.0625 + 0.5) / 4,
        itl_s=(0.015625 + 0.03125 + 0.03125 + 0.0234375) / 4,
        e2e_s=(1.5 + 2.25 + 0.75 + 3.5) / 4,
        max_num_seqs=None,
        healthy=True,
        last_updated=1000.0,
    )
    assert (states[KEY].labels.model, states[KEY].labels.runtime) == (MODEL, "vllm")


def test_engines_are_summed_and_the_fullest_kv_cache_counts() -> None:
    engines = (
        EngineLoad(running=4, waiting=1, kv_cache_usage=0.5),
        EngineLoad(running=2, waiting=0, kv_cache_usage=0.875),
    )
    state = scrape(render_page("0.13", engines)).states[KEY]
    assert (state.running, state.waiting, state.kv_cache_usage) == (6.0, 1.0, 0.875)


def test_rates_and_latencies_come_from_the_change_between_two_scrapes() -> None:
    before = scrape(render_page(engines=TWO_ENGINES), now=100.0)
    later = (
        EngineLoad(
            prefix_queries=512 + 100,
            prefix_hits=128 + 80,
            prompt_tokens=8192 + 1000,
            generation_tokens=2048 + 500,
            ttft_s=(0.125, 0.25, 1.0),
            itl_s=(0.015625, 0.5),
            e2e_s=(1.5, 2.25, 4.0),
        ),
        TWO_ENGINES[1],
    )
    after = scrape(render_page(engines=later), previous=before, now=110.0).states[KEY]
    assert after.prompt_tokens_per_s == pytest.approx(100.0)
    assert after.generation_tokens_per_s == pytest.approx(50.0)
    assert after.prefix_cache_hit_rate == pytest.approx(0.8)
    assert (after.ttft_s, after.itl_s, after.e2e_s) == (1.0, 0.5, 4.0)


def test_without_new_observations_latencies_fall_back_to_cumulative_means() -> None:
    before = scrape(render_page(), now=100.0)
    after = scrape(render_page(), previous=before, now=101.0).states[KEY]
    assert after == attrs.evolve(before.states[KEY], last_updated=101.0)
    assert after.prompt_tokens_per_s == 0.0


def test_a_restarted_runtime_counts_everything_since_the_restart() -> None:
    before = scrape(render_page(engines=(EngineLoad(prompt_tokens=50_000),)), now=100.0)
    fresh = EngineLoad(prompt_tokens=200, prefix_queries=10, prefix_hits=5, ttft_s=(2.0,))
    after = scrape(render_page(engines=(fresh,)), previous=before, now=102.0).states[KEY]
    assert after.prompt_tokens_per_s == pytest.approx(100.0)
    assert after.prefix_cache_hit_rate == 0.5
    assert after.ttft_s == 2.0


def test_lora_adapters_are_targets_with_their_base_models_load() -> None:
    states = scrape(recorded("vllm-0.13-lora.prom"), recorded("models-lora.json")).states
    base = states[KEY]
    assert base.adapters == ("chat-lora", "sql-lora", "summarise-lora")
    assert dict(base.labels.custom) == {"max_lora": "4"}
    for adapter, activity in [
        ("sql-lora", "running"),
        ("chat-lora", "running"),
        ("summarise-lora", "idle"),
    ]:
        lora = states[TargetKey(model=adapter, node=NODE, endpoint=ENDPOINT)]
        assert (lora.running, lora.waiting, lora.kv_cache_usage) == (3.0, 2.0, 0.375)
        assert lora.adapters == ()
        # The newest vllm:lora_requests_info series says which adapters are in the batch.
        assert dict(lora.labels.custom) == {"lora_parent": MODEL, "lora_state": activity}


@pytest.mark.parametrize(
    ("status", "reason"),
    [(503, "engine is dead"), (500, "HTTP 500")],
)
def test_a_failing_health_check_makes_targets_unhealthy_with_a_reason(
    status: int, reason: str
) -> None:
    state = scrape(render_page(), health=status).states[KEY]
    assert not state.healthy
    assert reason in state.health_reason
    assert state.running == 3.0


def test_a_sleeping_engine_is_not_healthy() -> None:
    state = scrape(render_page(engines=(EngineLoad(awake=False),))).states[KEY]
    assert not state.healthy
    assert "sleeping" in state.health_reason


def test_max_num_seqs_is_read_from_cache_config_info_and_summed_over_engines() -> None:
    state = scrape(render_page(engines=TWO_ENGINES, max_num_seqs=256)).states[KEY]
    assert state.max_num_seqs == 512


def test_a_served_model_alias_uses_the_servers_load() -> None:
    state = scrape(render_page(), models_json("llama-8b")).states
    alias = state[TargetKey(model="llama-8b", node=NODE, endpoint=ENDPOINT)]
    assert (alias.running, alias.waiting) == (3.0, 2.0)


@pytest.mark.parametrize(
    ("page", "message"),
    [
        ("<html>502 Bad Gateway</html>", "no vllm:num_requests_running series"),
        ("", "no vllm:num_requests_running series"),
        ('vllm:num_requests_running{model_name="m" 1\n', "malformed metrics page, line 1"),
    ],
)
def test_a_page_that_is_not_vllm_metrics_is_a_clear_error(page: str, message: str) -> None:
    with pytest.raises(VllmPageError, match=message) as caught:
        read_metrics(page, now=0.0)
    assert caught.value.path == "/metrics"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "not JSON"),
        ('{"object": "list"}', "not an OpenAI model list"),
        ('{"data": [{"object": "model"}]}', "entry 0 has no string 'id'"),
    ],
)
def test_a_models_answer_that_is_not_a_model_list_is_a_clear_error(body: str, message: str) -> None:
    with pytest.raises(VllmPageError, match=message) as caught:
        read_models(body)
    assert caught.value.path == "/v1/models"

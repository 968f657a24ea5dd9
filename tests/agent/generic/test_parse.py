"""Each shipped mapping reads its runtime's recorded pages: values, unit conversions, rates and
interval means from two scrapes taken with an injected clock, absent signals, garbage pages."""

from __future__ import annotations

import pytest

from infermesh.agent.runtimes.generic.mapping import parse_mapping, shipped_mapping
from infermesh.agent.runtimes.generic.tracker import (
    FetchFailed,
    GenericTracker,
    PageFetched,
)
from infermesh.core.model import ModelState, TargetKey
from tests.agent.generic.pages import MODELS_FILE, body, page

ENDPOINT = "http://10.0.0.7:8080"
T0 = 1_700_000_000.0


def tracker(kind: str, models: tuple[str, ...] = ()) -> GenericTracker:
    return GenericTracker(
        mapping=shipped_mapping(kind), node="n1", endpoint=ENDPOINT, models=models
    )


def fetched(
    kind: str, scrape: int, health: dict[str, tuple[int, bytes]] | None = None
) -> PageFetched:
    models = MODELS_FILE.get(kind)
    return PageFetched(
        metrics_text=page(f"{kind}-{scrape}.prom"),
        models_body=body(models) if models else None,
        health={"": (200, b"")} if health is None else health,
    )


def state(t: GenericTracker, model: str) -> ModelState:
    return t.states[TargetKey(model=model, node="n1", endpoint=ENDPOINT)]


def two_scrapes(
    kind: str, models: tuple[str, ...] = (), **health: tuple[int, bytes]
) -> GenericTracker:
    t = tracker(kind, models)
    answers = dict(health) or None
    t.observe(fetched(kind, 1, answers), T0)
    t.observe(fetched(kind, 2, answers), T0 + 10.0)
    return t


def test_tgi_first_scrape_gives_gauges_and_cumulative_means() -> None:
    t = tracker("tgi")
    t.observe(fetched("tgi", 1), T0)
    s = state(t, "meta-llama/Llama-3.1-8B-Instruct")
    assert (s.running, s.waiting) == (8, 3)
    assert s.e2e_s == pytest.approx(236 / 118)
    assert s.itl_s == pytest.approx(0.025)
    assert s.prompt_tokens_per_s == 0.0  # a rate needs two scrapes
    assert s.labels.runtime == "tgi"
    assert s.healthy
    assert s.last_updated == T0


def test_tgi_second_scrape_gives_rates_and_interval_means() -> None:
    s = state(two_scrapes("tgi"), "meta-llama/Llama-3.1-8B-Instruct")
    assert (s.running, s.waiting) == (10, 5)
    assert s.e2e_s == pytest.approx(3.0)  # 30 s over the 10 requests of the interval
    assert s.itl_s == pytest.approx(0.03)
    assert s.prompt_tokens_per_s == pytest.approx(500.0)
    assert s.generation_tokens_per_s == pytest.approx(200.0)


def test_tgi_lacks_kv_cache_prefix_cache_and_ttft() -> None:
    s = state(two_scrapes("tgi"), "meta-llama/Llama-3.1-8B-Instruct")
    assert s.kv_cache_usage == 0.0
    assert s.prefix_cache_hit_rate is None
    assert s.ttft_s is None
    assert s.max_num_seqs is None


def test_sglang_sums_ranks_and_takes_the_fullest_cache() -> None:
    t = tracker("sglang")
    t.observe(fetched("sglang", 1), T0)
    s = state(t, "Qwen/Qwen2.5-7B-Instruct")
    assert (s.running, s.waiting) == (7, 3)
    assert s.kv_cache_usage == pytest.approx(0.61)
    assert s.prefix_cache_hit_rate == pytest.approx(0.35)
    assert s.ttft_s == pytest.approx(15.0 / 120)  # streaming and not, together
    assert s.itl_s == pytest.approx(0.02)
    assert s.e2e_s == pytest.approx(2.5)


def test_sglang_second_scrape_gives_rates_and_interval_means() -> None:
    s = state(two_scrapes("sglang"), "Qwen/Qwen2.5-7B-Instruct")
    assert s.running == 8
    assert s.ttft_s == pytest.approx(0.25)
    assert s.itl_s == pytest.approx(0.03)
    assert s.e2e_s == pytest.approx(2.5)
    assert s.prompt_tokens_per_s == pytest.approx(400.0)
    assert s.generation_tokens_per_s == pytest.approx(300.0)


def test_sglang_names_escaped_to_underscores_read_the_same() -> None:
    colons, underscores = tracker("sglang"), tracker("sglang")
    colons.observe(fetched("sglang", 1), T0)
    escaped = PageFetched(
        metrics_text=page("sglang-1-underscores.prom"),
        models_body=body("sglang-models.json"),
        health={"": (200, b"")},
    )
    underscores.observe(escaped, T0)
    model = "Qwen/Qwen2.5-7B-Instruct"
    assert state(underscores, model) == state(colons, model)


def test_torchserve_latency_counters_in_microseconds_become_seconds_per_request() -> None:
    t = tracker("torchserve")
    t.observe(fetched("torchserve", 1), T0)
    assert state(t, "mnist").e2e_s == pytest.approx(0.05)
    assert state(t, "resnet-18").e2e_s == pytest.approx(0.12)
    t.observe(fetched("torchserve", 2), T0 + 10.0)
    assert state(t, "mnist").e2e_s == pytest.approx(0.06)  # 600 ms over 10 new requests
    assert state(t, "resnet-18").e2e_s == pytest.approx(0.12)  # quiet: last known mean kept
    assert state(t, "mnist").running == 0.0
    assert state(t, "mnist").ttft_s is None


def test_tfserving_latency_histogram_in_microseconds_per_model() -> None:
    ok = (200, body("tfserving-status.json"))
    t = two_scrapes("tfserving", ("half_plus_two",), half_plus_two=ok)
    s = state(t, "half_plus_two")
    assert s.e2e_s == pytest.approx(0.005)  # 50 ms over the 10 REST requests of the interval
    assert s.healthy
    assert s.labels.runtime == "tfserving"


def test_tfserving_model_without_an_available_version_is_unhealthy() -> None:
    t = tracker("tfserving", ("half_plus_two",))
    loading = {"half_plus_two": (200, body("tfserving-status-loading.json"))}
    t.observe(fetched("tfserving", 1, loading), T0)
    s = state(t, "half_plus_two")
    assert not s.healthy
    assert "no AVAILABLE version (version 124 LOADING)" in s.health_reason


def test_ovms_lists_available_models_and_reads_microsecond_histograms() -> None:
    t = tracker("ovms")
    t.observe(fetched("ovms", 1), T0)
    assert sorted(k.model for k in t.states) == ["dummy", "resnet"]  # "retired" has ended
    assert state(t, "resnet").running == 4
    assert state(t, "resnet").e2e_s == pytest.approx(0.02)
    assert state(t, "dummy").e2e_s is None  # no series: absent, not zero
    t.observe(fetched("ovms", 2), T0 + 10.0)
    assert state(t, "resnet").running == 6
    assert state(t, "resnet").e2e_s == pytest.approx(0.025)


def test_a_counter_reset_counts_everything_since_the_restart() -> None:
    t = tracker("tgi")
    t.observe(fetched("tgi", 2), T0)
    t.observe(fetched("tgi", 1), T0 + 10.0)  # counters went down: the server restarted
    s = state(t, "meta-llama/Llama-3.1-8B-Instruct")
    assert s.prompt_tokens_per_s == pytest.approx(59000 / 10)
    assert s.e2e_s == pytest.approx(236 / 118)


def test_unhealthy_server_marks_its_models_with_the_health_path() -> None:
    t = tracker("sglang")
    observation = t.observe(fetched("sglang", 1, {"": (503, b"")}), T0)
    s = state(t, "Qwen/Qwen2.5-7B-Instruct")
    assert not s.healthy
    assert s.health_reason == "SGLang /health returned HTTP 503; check the server's log"
    assert observation.problem_started == s.health_reason


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("<html><body>Bad Gateway</body></html>", "line 1 is '<html><body>Bad Gateway"),
        ('{"error": "not found"}', "not a Prometheus text page"),
        ('tgi_queue_size{le="1} 3\n', "malformed metrics page"),
    ],
)
def test_a_garbage_page_keeps_the_last_values_marked_unhealthy(text: str, says: str) -> None:
    t = tracker("tgi")
    t.observe(fetched("tgi", 1), T0)
    garbage = PageFetched(metrics_text=text, models_body=body("tgi-models.json"), health={})
    observation = t.observe(garbage, T0 + 1.0)
    s = state(t, "meta-llama/Llama-3.1-8B-Instruct")
    assert not s.healthy
    assert says in s.health_reason
    assert f"cannot read {ENDPOINT}/metrics" in s.health_reason
    assert (s.running, s.last_updated) == (8, T0)  # last good values, turning stale
    assert observation.problem_started
    assert t.observe(fetched("tgi", 2), T0 + 2.0).recovered
    assert state(t, "meta-llama/Llama-3.1-8B-Instruct").healthy


def test_a_bad_model_list_names_the_endpoint() -> None:
    t = tracker("torchserve")
    bad = PageFetched(page("torchserve-1.prom"), b'{"data": []}', {"": (200, b"")})
    t.observe(bad, T0)
    assert t.problem.startswith(f"cannot read {ENDPOINT}/models: not a TorchServe list")


def test_a_model_that_leaves_the_list_is_unloaded() -> None:
    t = tracker("tgi")
    t.observe(fetched("tgi", 1), T0)
    other = PageFetched(page("tgi-2.prom"), b'{"data": [{"id": "other"}]}', {"": (200, b"")})
    t.observe(other, T0 + 1.0)
    assert not state(t, "meta-llama/Llama-3.1-8B-Instruct").loaded
    assert state(t, "other").loaded


def test_a_fetch_failure_is_reported_once() -> None:
    t = tracker("tgi")
    t.observe(fetched("tgi", 1), T0)
    first = t.observe(FetchFailed("cannot connect"), T0 + 1.0)
    second = t.observe(FetchFailed("cannot connect"), T0 + 2.0)
    assert first.problem_started == "cannot connect"
    assert not second.problem_started
    assert t.observe(fetched("tgi", 2), T0 + 3.0).recovered


PERCENT_AND_MS = """
runtime = "custom"
[metrics]
model_label = "model"
[models]
source = "metrics"
[signals.kv_cache_usage]
metric = "cache_used_percent"
unit = "percent"
[signals.ttft_s]
metric = "first_token_ms"
type = "histogram_mean"
unit = "ms"
[signals.prefix_cache_hit_rate]
metric = "prefix_hits_total"
per = "prefix_lookups_total"
type = "counter_ratio"
[signals.running]
metric = "requests_in_progress"
labels = { phase = "decode" }
"""

CUSTOM_PAGE = """# TYPE cache_used_percent gauge
cache_used_percent{{model="a"}} {cache}
cache_used_percent{{model="b"}} 120
# TYPE first_token_ms summary
first_token_ms{{model="a",quantile="0.5"}} 80
first_token_ms_sum{{model="a"}} {ttft_sum}
first_token_ms_count{{model="a"}} {ttft_count}
prefix_hits_total{{model="a"}} {hits}
prefix_lookups_total{{model="a"}} {lookups}
requests_in_progress{{model="a",phase="decode"}} 3
requests_in_progress{{model="a",phase="prefill"}} 9
"""


def test_percent_and_milliseconds_are_converted_and_label_filters_apply() -> None:
    mapping = parse_mapping(PERCENT_AND_MS, "custom.toml")
    t = GenericTracker(mapping=mapping, node="n1", endpoint=ENDPOINT)

    def scrape(now: float, **values: float) -> None:
        text = CUSTOM_PAGE.format(**values)
        t.observe(PageFetched(metrics_text=text, models_body=None, health={}), now)

    scrape(T0, cache=42.0, ttft_sum=1200.0, ttft_count=10, hits=30, lookups=100)
    a, b = state(t, "a"), state(t, "b")  # the models are the label's values on the page
    assert a.kv_cache_usage == pytest.approx(0.42)
    assert b.kv_cache_usage == 1.0  # clamped to a fraction
    assert a.ttft_s == pytest.approx(0.12)  # a summary's _sum/_count in ms
    assert a.prefix_cache_hit_rate == pytest.approx(0.3)
    assert a.running == 3  # only the decode series
    assert b.ttft_s is None
    scrape(T0 + 5.0, cache=50.0, ttft_sum=1500.0, ttft_count=15, hits=70, lookups=150)
    a = state(t, "a")
    assert a.ttft_s == pytest.approx(0.06)  # 300 ms over the 5 new observations
    assert a.prefix_cache_hit_rate == pytest.approx(0.8)  # 40 hits in 50 lookups

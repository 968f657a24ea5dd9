"""Mapping files are validated when the agent starts: every mistake names the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.agent.runtimes.generic.mapping import (
    SHIPPED,
    MappingError,
    load_mapping_file,
    parse_mapping,
    shipped_mapping,
)

GOOD = """
runtime = "llamacpp"
title = "llama.cpp"

[models]
source = "config"

[signals.running]
metric = "llamacpp:requests_processing"

[signals.kv_cache_usage]
metric = "llamacpp:kv_cache_usage_ratio"
unit = "fraction"

[signals.e2e_s]
metric = "my_server_request_ms"
type = "histogram_mean"
unit = "ms"
"""


@pytest.mark.parametrize("kind", SHIPPED)
def test_every_shipped_mapping_is_valid_and_names_its_runtime(kind: str) -> None:
    mapping = shipped_mapping(kind)
    assert mapping.runtime == kind
    assert mapping.signals  # each maps at least one signal
    assert "e2e_s" in mapping.signals


def test_a_good_mapping_reads_with_defaults() -> None:
    mapping = parse_mapping(GOOD, "test.toml")
    assert mapping.metrics_path == "/metrics"
    assert mapping.health_path == "/health"
    assert mapping.signals["running"].type == "gauge"
    assert mapping.signals["kv_cache_usage"].aggregate == "max"
    assert mapping.signals["e2e_s"].factor == pytest.approx(1e-3)
    assert mapping.families == {
        "llamacpp:requests_processing",
        "llamacpp:kv_cache_usage_ratio",
        "my_server_request_ms_sum",
        "my_server_request_ms_count",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("[signals.e2e_s]", "[signals.latency]"), "unknown key(s) signals.latency"),
        (('unit = "ms"', 'unit = "fortnights"'), "signals.e2e_s.unit must be one of s, ms, us"),
        (('unit = "fraction"', 'unit = "ms"'), "signals.kv_cache_usage.unit must be one of"),
        (('type = "histogram_mean"', 'type = "counter_rate"'), "signals.e2e_s.type must be one"),
        (('metric = "my_server_request_ms"', 'metric = "my-server"'), "signals.e2e_s.metric must"),
        (
            ('metric = "my_server_request_ms"', "metrik = 'x'"),
            "unknown key(s) signals.e2e_s.metrik",
        ),
        (('type = "histogram_mean"', 'type = "counter_ratio"'), "signals.e2e_s.per is required"),
        (('runtime = "llamacpp"', ""), "runtime is required"),
        (('source = "config"', 'source = "consul"'), "models.source must be one of config"),
        (('source = "config"', 'source = "openai"'), "models.path is required"),
        (('source = "config"', 'source = "metrics"'), "needs metrics.model_label"),
        (('title = "llama.cpp"', "title = 3"), "title must be a string, got 3"),
        (('title = "llama.cpp"', 'title = "x"\nhealth = { check = "model_status" }'), "{model}"),
        (("[models]", "[modles]"), "unknown key(s) modles"),
        (('unit = "ms"', 'unit = "ms"\nlabels = { status = 200 }'), "signals.e2e_s.labels.status"),
        (("[models]", "[metrics]\nport = 0\n[models]"), "metrics.port must be a port number"),
    ],
)
def test_a_bad_mapping_names_the_key(change: tuple[str, str], message: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(MappingError) as caught:
        parse_mapping(text, "mapping file 'x.toml'")
    assert message in str(caught.value)
    assert str(caught.value).startswith("mapping file 'x.toml': ")


def test_a_mapping_that_is_not_toml_says_so() -> None:
    with pytest.raises(MappingError, match=r"x\.toml': not valid TOML"):
        parse_mapping("runtime = ", "mapping file 'x.toml'")


def test_a_missing_mapping_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(MappingError, match=r"nope\.toml' cannot be read"):
        load_mapping_file(missing)


def test_a_mapping_file_is_read_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "llamacpp.toml"
    path.write_text(GOOD, encoding="utf-8")
    assert load_mapping_file(path).runtime == "llamacpp"


def test_the_example_mapping_in_the_docs_is_valid() -> None:
    docs = Path(__file__).parents[3] / "docs" / "adapters-generic.md"
    text = docs.read_text(encoding="utf-8")
    start = text.index("# /etc/infermesh/llamacpp.toml")
    example = text[start : text.index("```", start)]
    mapping = parse_mapping(example, "docs example")
    assert mapping.runtime == "llamacpp"
    assert set(mapping.signals) == {
        "running",
        "waiting",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
    }

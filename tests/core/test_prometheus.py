"""The Prometheus text scraper reads exactly the series asked for, the way Prometheus reads them."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infermesh.core.prometheus import Histogram as ReadHistogram
from infermesh.core.prometheus import (
    LabelSet,
    MetricsParseError,
    Sample,
    histogram_mean,
    histogram_quantile,
    histograms_by_labels,
    parse_samples,
)


def _exposition() -> str:
    registry = CollectorRegistry()
    requests = Counter("app:requests", "Requests.", ["path", "code"], registry=registry)
    requests.labels('/a"b', "200").inc(3)
    requests.labels("back\\slash\nnewline", "500").inc(0.5)
    depth = Gauge("app:queue_depth", "Depth.", ["queue"], registry=registry)
    depth.labels("fast").set(7)
    depth.labels("nan").set(math.nan)
    depth.labels("inf").set(math.inf)
    latency = Histogram(
        "app:latency_seconds", "Latency.", ["path"], buckets=(0.1, 0.5, 1.0), registry=registry
    )
    for value in (0.05, 0.2, 0.3, 0.7, 2.0):
        latency.labels("/a").observe(value)
    Gauge("other_metric", "Unwanted.", registry=registry).set(1)
    return generate_latest(registry).decode()


Row = tuple[str, dict[str, str], float]


def _client_samples(text: str, family: str) -> list[Row]:
    """What prometheus_client's own parser reads for `family` (the reference)."""
    found = []
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name == family or sample.name.startswith(family + "_"):
                found.append((sample.name, dict(sample.labels), float(sample.value)))
    return found


def _as_tuples(samples: list[Sample]) -> list[Row]:
    return [(s.name, dict(s.labels), s.value) for s in samples]


def _same(
    a: list[tuple[str, dict[str, str], float]], b: list[tuple[str, dict[str, str], float]]
) -> bool:
    def key(item: tuple[str, dict[str, str], float]) -> tuple[str, str, str]:
        name, labels, value = item
        return name, repr(sorted(labels.items())), "nan" if math.isnan(value) else repr(value)

    return sorted(map(key, a)) == sorted(map(key, b))


@pytest.mark.parametrize("family", ["app:requests", "app:queue_depth", "app:latency_seconds"])
def test_reads_what_prometheus_client_reads_from_its_own_exposition(family: str) -> None:
    text = _exposition()
    found = parse_samples(text, [family])
    assert _same(_as_tuples(found[family]), _client_samples(text, family))


def test_label_escapes_special_values_and_suffixes_are_read() -> None:
    found = parse_samples(_exposition(), ["app:requests", "app:queue_depth"])
    totals = {s.labels["path"]: s.value for s in found["app:requests"] if s.name.endswith("_total")}
    assert totals == {'/a"b': 3.0, "back\\slash\nnewline": 0.5}
    assert {s.name for s in found["app:requests"]} == {"app:requests_total", "app:requests_created"}
    depth = {s.labels["queue"]: s.value for s in found["app:queue_depth"]}
    assert depth["fast"] == 7.0
    assert math.isnan(depth["nan"])
    assert depth["inf"] == math.inf


def test_only_wanted_families_are_returned_and_unwanted_lines_are_never_parsed() -> None:
    text = (
        "# HELP wanted A gauge.\n"
        "# TYPE wanted gauge\n"
        'wanted{a="1"} 2\n'
        "wanted_but_longer 3\n"
        "unwanted{this is not prometheus at all\n"
        "<html><body>garbage</body></html>\n"
    )
    found = parse_samples(text, ["wanted", "absent"])
    assert found == {"wanted": [Sample("wanted", {"a": "1"}, 2.0)], "absent": []}


def test_colon_and_underscore_spellings_are_the_same_series_keyed_as_asked() -> None:
    text = 'vllm_num_requests_running{engine="0"} 4\nvllm_prompt_tokens_total 10\n'
    found = parse_samples(text, ["vllm:num_requests_running", "vllm:prompt_tokens"])
    assert found["vllm:num_requests_running"] == [
        Sample("vllm:num_requests_running", {"engine": "0"}, 4.0)
    ]
    assert found["vllm:prompt_tokens"][0].name == "vllm:prompt_tokens_total"


def test_an_exact_family_name_wins_over_another_familys_suffix() -> None:
    text = "job_count 5\njob_sum 2\n"
    found = parse_samples(text, ["job", "job_count"])
    assert [s.name for s in found["job_count"]] == ["job_count"]
    assert [s.name for s in found["job"]] == ["job_sum"]


def test_timestamps_crlf_blank_lines_comments_and_indentation() -> None:
    text = (
        "# a comment\r\n"
        "\r\n"
        "  up 1 1700000000000\r\n"
        'up{instance="b" , job="x",} \t0\r\n'
        "\tup{} +Inf\n"
    )
    found = parse_samples(text, ["up"])["up"]
    assert found == [
        Sample("up", {}, 1.0, 1_700_000_000.0),
        Sample("up", {"instance": "b", "job": "x"}, 0.0),
        Sample("up", {}, math.inf),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('up{job="x" 1', "expected ',' or '}'"),
        ('up{job="x"', "expected ',' or '}'"),
        ("up{job=x} 1", "malformed label set"),
        ('up{job="x",job="y"} 1', "duplicate label 'job'"),
        ('up{job="a\\tb"} 1', "invalid escape sequence"),
        ("up", "missing sample value"),
        ("up one", "value 'one' is not a number"),
        ("up 1_000", "value '1_000' is not a number"),
        ("up 1 2 3", "unexpected text after value"),
        ("up 1 soon", "timestamp 'soon' is not a number"),
        ("up 1 +Inf", "timestamp is not a finite number"),
    ],
)
def test_a_malformed_wanted_line_raises_with_line_number_and_reason(line: str, reason: str) -> None:
    text = f"# HELP up Up.\nother 1\n{line}\n"
    with pytest.raises(MetricsParseError) as caught:
        parse_samples(text, ["up"])
    assert caught.value.line_no == 3
    assert reason in caught.value.reason
    assert "line 3" in str(caught.value)


@pytest.mark.parametrize(
    "page",
    [
        "",
        "\x00\x01\x02binary\xff",
        "<!doctype html><html><head><title>502 Bad Gateway</title></head></html>",
        '{"detail": "Not Found"}',
        "upstream connect error or disconnect/reset before headers",
    ],
)
def test_garbage_pages_without_wanted_series_give_empty_results(page: str) -> None:
    assert parse_samples(page, ["up", "vllm:num_requests_running"]) == {
        "up": [],
        "vllm:num_requests_running": [],
    }


@pytest.mark.parametrize(
    "page", ["up" + "{" * 10_000, "up{" + 'a="b",' * 1000, 'up{a="b"' + " " * 50_000 + "x"]
)
def test_garbage_in_a_wanted_series_is_a_parse_error(page: str) -> None:
    with pytest.raises(MetricsParseError) as caught:
        parse_samples(page, ["up", "vllm:num_requests_running"])
    assert caught.value.line_no == 1


def test_a_family_name_that_is_not_a_metric_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        parse_samples("", ["bad name"])


def test_samples_are_immutable_and_hashable() -> None:
    sample = parse_samples('up{a="1"} 1\n', ["up"])["up"][0]
    assert hash(sample) == hash(Sample("up", {"a": "1"}, 1.0))
    with pytest.raises(TypeError):
        sample.labels["a"] = "2"  # type: ignore[index]
    assert sample.labels == {"a": "1"}
    assert LabelSet({"a": "1", "le": "0.5"}).without("le") == LabelSet({"a": "1"})


def test_histogram_mean_and_quantile_per_series_match_promql() -> None:
    text = _exposition()
    samples = parse_samples(text, ["app:latency_seconds"])["app:latency_seconds"]
    series = LabelSet({"path": "/a"})
    assert histogram_mean(samples) == {series: pytest.approx((0.05 + 0.2 + 0.3 + 0.7 + 2.0) / 5)}
    # 5 observations, buckets (0.1: 1, 0.5: 3, 1.0: 4, +Inf: 5). The median (rank 2.5) lies in
    # (0.1, 0.5] with 2 observations: 0.1 + 0.4 * (2.5 - 1) / 2.
    assert histogram_quantile(0.5, samples) == {series: pytest.approx(0.4)}
    # Rank 4.95 falls in the +Inf bucket: PromQL answers the highest finite bound.
    assert histogram_quantile(0.99, samples) == {series: 1.0}


def test_histograms_of_several_series_are_grouped_without_le_and_can_be_combined() -> None:
    text = (
        'h_bucket{engine="0",le="1.0"} 2\nh_bucket{engine="0",le="+Inf"} 2\n'
        'h_sum{engine="0"} 1\nh_count{engine="0"} 2\n'
        'h_bucket{engine="1",le="1.0"} 1\nh_bucket{engine="1",le="+Inf"} 2\n'
        'h_sum{engine="1"} 3\nh_count{engine="1"} 2\n'
    )
    samples = parse_samples(text, ["h"])["h"]
    per_engine = histograms_by_labels(samples)
    assert per_engine[LabelSet({"engine": "0"})] == ReadHistogram(2, 1, ((1.0, 2), (math.inf, 2)))
    combined = ReadHistogram.from_samples(samples)
    assert combined == ReadHistogram(4, 4, ((1.0, 3), (math.inf, 4)))
    assert combined.mean == 1.0
    window = combined - per_engine[LabelSet({"engine": "1"})]
    assert window == per_engine[LabelSet({"engine": "0"})]


def test_histogram_without_observations_or_buckets_has_no_mean_or_quantile() -> None:
    assert ReadHistogram().mean is None
    assert ReadHistogram(count=3, sum=1.5).quantile(0.5) is None
    with pytest.raises(ValueError, match="outside"):
        ReadHistogram().quantile(1.5)

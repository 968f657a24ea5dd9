"""llama-server's pages become model state: busy slots run, deferred requests wait, and every
problem makes the model unhealthy with a reason an operator can act on."""

from __future__ import annotations

import json

from infermesh_example_runtime.parse import Page, Poll, Tracker

URL = "http://10.0.0.7:8080"
METRICS = b"llamacpp:kv_cache_usage_ratio 0.5\nllamacpp:requests_deferred 3\n"


def poll(
    health: Page = (200, b'{"status": "ok"}'),
    props: Page | None = None,
    busy: int = 1,
    slots: Page | None = None,
    metrics: Page = (200, METRICS),
) -> Poll:
    props_body = {"model_alias": "acme/llama", "total_slots": 4}
    slot_list = [{"id": i, "is_processing": i < busy} for i in range(4)]
    return Poll(
        URL,
        health,
        props if props is not None else (200, json.dumps(props_body).encode()),
        slots if slots is not None else (200, json.dumps(slot_list).encode()),
        metrics,
    )


def tracker(model: str = "") -> Tracker:
    return Tracker("node-1", URL, model, first_version=100)


def test_busy_slots_run_deferred_requests_wait_and_the_slot_count_is_the_parallelism() -> None:
    [delta] = tracker().observe(poll(busy=3), now=50.0)
    assert delta.key.target_id == f"node-1|{URL}|acme/llama"
    assert delta.version == 101
    changes = delta.changes
    assert (changes["running"], changes["waiting"], changes["max_num_seqs"]) == (3.0, 3.0, 4)
    assert changes["kv_cache_usage"] == 0.5
    assert changes["last_updated"] == 50.0
    assert changes["labels"].runtime == "llamacpp"


def test_only_what_changed_is_sent_again() -> None:
    source = tracker()
    source.observe(poll(busy=1), now=1.0)
    [delta] = source.observe(poll(busy=2), now=2.0)
    assert set(delta.changes) == {"running", "last_updated"}


def test_without_metrics_nothing_waits_and_kv_usage_is_not_invented() -> None:
    no_metrics = (501, b'{"error": {"message": "This server does not support metrics endpoint."}}')
    [delta] = tracker().observe(poll(metrics=no_metrics), now=1.0)
    assert "kv_cache_usage" not in delta.changes
    assert "waiting" not in delta.changes  # 0, the default


def test_a_loading_server_makes_its_model_unhealthy_with_the_reason() -> None:
    source = tracker()
    source.observe(poll(), now=1.0)
    loading = (503, b'{"error": {"code": 503, "message": "Loading model"}}')
    [delta] = source.observe(poll(health=loading), now=2.0)
    assert delta.changes["healthy"] is False
    assert delta.changes["health_reason"].startswith(
        f"llama-server at {URL} is not ready: HTTP 503"
    )
    assert "Loading model" in delta.changes["health_reason"]
    [delta] = source.observe(poll(), now=3.0)
    assert (delta.changes["healthy"], delta.changes["health_reason"]) == (True, "")


def test_disabled_slots_and_unreachable_servers_are_explained() -> None:
    source = tracker(model="acme/llama")
    [delta] = source.observe(poll(slots=(501, b"not supported")), now=1.0)
    assert "HTTP 501" in delta.changes["health_reason"]
    assert "started with --no-slots? the adapter needs /slots" in delta.changes["health_reason"]
    down = "cannot connect to http://10.0.0.7:8080/health (refused)"
    [delta] = source.observe(poll(health=down), now=2.0)
    assert delta.changes["health_reason"] == down
    assert source.problem == down


def test_the_model_name_comes_from_config_then_the_alias_then_the_file_name() -> None:
    no_alias = (200, b'{"model_path": "/models/qwen2.5-7b-q4_k_m.gguf", "total_slots": 4}')
    [delta] = tracker().observe(poll(props=no_alias), now=1.0)
    assert delta.key.model == "qwen2.5-7b-q4_k_m.gguf"
    [delta] = tracker(model="site/llama").observe(poll(), now=1.0)
    assert delta.key.model == "site/llama"
    nameless = tracker()
    assert nameless.observe(poll(props=(200, b'{"total_slots": 4}')), now=1.0) == []
    assert nameless.problem == f"{URL}/props names no model; set the runtime's options.model"


def test_a_new_model_unloads_the_old_one() -> None:
    source = tracker()
    source.observe(poll(), now=1.0)
    renamed = (200, b'{"model_alias": "acme/other", "total_slots": 4}')
    old, new = source.observe(poll(props=renamed), now=2.0)
    assert (old.key.model, old.changes["loaded"]) == ("acme/llama", False)
    assert new.key.model == "acme/other"

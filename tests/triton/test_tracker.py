"""The Triton tracker: deltas on change only, outages and recovery reported once, lost models."""

from __future__ import annotations

import json
from pathlib import Path

from infermesh.core.model import ModelState, TargetKey
from infermesh.triton.tracker import FetchFailed, PageFetched, TargetTracker

PAGES = Path(__file__).parent / "pages"
ENDPOINT = "http://10.0.0.7:8000"
METRICS = "http://10.0.0.7:8002/metrics"
SIMPLE = TargetKey(model="simple", node="n1", endpoint=ENDPOINT)


def tracker() -> TargetTracker:
    return TargetTracker(
        node="n1",
        endpoint=ENDPOINT,
        metrics_url=METRICS,
        index_url=ENDPOINT + "/v2/repository/index",
        custom_labels={"kserve_grpc": "10.0.0.7:8001"},
    )


def fetched(
    page: str = "gpu_two_models.txt",
    states: dict[str, str] | None = None,
    ready_status: int = 200,
) -> PageFetched:
    states = {"simple": "READY"} if states is None else states
    rows = [
        {"name": name, "version": "1", "state": state, "reason": ""}
        for name, state in states.items()
    ]
    return PageFetched(
        metrics_text=(PAGES / page).read_text(),
        index_json=json.dumps(rows),
        ready_status=ready_status,
    )


def test_first_scrape_emits_every_model_and_then_only_changes() -> None:
    watch = tracker()
    first = watch.observe(fetched(), now=1.0)
    assert [d.key for d in first.deltas] == [SIMPLE]
    assert dict(watch.states[SIMPLE].labels.custom)["kserve_grpc"] == "10.0.0.7:8001"
    again = watch.observe(fetched(), now=1.0)
    assert again.deltas == ()
    later = watch.observe(fetched(), now=2.0)
    assert [set(d.changes) for d in later.deltas] == [{"last_updated"}]
    assert later.deltas[0].version > first.deltas[0].version


def test_estimates_are_kept_per_model_and_version() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    assert set(watch.estimates) == {("densenet_onnx", "1"), ("simple", "1"), ("simple", "2")}
    assert watch.reading is not None
    assert watch.reading.gpus


def test_an_outage_is_reported_once_and_keeps_the_last_values() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    down = watch.observe(FetchFailed("cannot connect to http://10.0.0.7:8002/metrics"), now=2.0)
    assert down.problem_started == "cannot connect to http://10.0.0.7:8002/metrics"
    state = watch.states[SIMPLE]
    assert not state.healthy
    assert state.waiting == 1  # last known
    assert state.last_updated == 1.0  # so it also turns stale
    still = watch.observe(FetchFailed("cannot connect to http://10.0.0.7:8002/metrics"), now=3.0)
    assert still.problem_started == ""
    assert still.deltas == ()
    back = watch.observe(fetched(), now=4.0)
    assert back.recovered
    assert watch.states[SIMPLE].healthy


def test_a_garbage_metrics_page_makes_the_server_unusable_with_the_url() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    observation = watch.observe(fetched(page="html_error.txt"), now=2.0)
    assert observation.problem_started.startswith(f"cannot read {METRICS}: the answer is HTML")
    assert not watch.states[SIMPLE].healthy


def test_a_page_without_model_series_while_models_are_ready_is_a_clear_error() -> None:
    observation = tracker().observe(fetched(page="no_models.txt"), now=1.0)
    assert "no nv_inference_* series although models simple are READY" in (
        observation.problem_started
    )


def test_unloading_is_not_a_server_problem_but_the_model_is_not_loaded() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    observation = watch.observe(fetched(states={"simple": "UNAVAILABLE"}), now=2.0)
    assert observation.problem_started == ""
    assert not watch.states[SIMPLE].loaded
    reloaded = watch.observe(fetched(), now=3.0)
    assert reloaded.deltas[0].changes["loaded"] is True


def test_a_model_gone_from_the_index_becomes_not_loaded() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    watch.observe(fetched(page="no_models.txt", states={}), now=2.0)
    state: ModelState = watch.states[SIMPLE]
    assert not state.loaded
    assert state.last_updated == 2.0


def test_a_server_that_turns_not_ready_is_a_problem_logged_once() -> None:
    watch = tracker()
    watch.observe(fetched(), now=1.0)
    observation = watch.observe(fetched(ready_status=400), now=2.0)
    assert "/v2/health/ready returned 400" in observation.problem_started
    assert not watch.states[SIMPLE].healthy
    assert watch.observe(fetched(), now=3.0).recovered

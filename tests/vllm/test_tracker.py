"""Scrape outcomes become versioned deltas, and each problem is reported once."""

from __future__ import annotations

from infermesh.core.model import ModelState, TargetKey
from infermesh.vllm.tracker import FetchFailed, PageFetched, TargetTracker
from tests.vllm.pages import MODEL, EngineLoad, models_json, render_page

ENDPOINT = "http://10.0.0.7:8000"
KEY = TargetKey(model=MODEL, node="n1", endpoint=ENDPOINT)


def page(running: int = 3, adapters: tuple[str, ...] = (), health: int = 200) -> PageFetched:
    return PageFetched(
        metrics_text=render_page(engines=(EngineLoad(running=running),)),
        models_json=models_json(adapters=adapters),
        health_status=health,
    )


def tracker() -> TargetTracker:
    return TargetTracker(node="n1", endpoint=ENDPOINT, first_version=500)


def test_the_first_scrape_emits_the_whole_state_and_later_ones_only_what_changed() -> None:
    states = tracker()
    first = states.observe(page(running=3), now=10.0)
    assert [d.version for d in first.deltas] == [500]
    assert ModelState.from_delta(first.deltas[0]) == states.states[KEY]
    assert first.deltas[0].changes["running"] == 3.0

    again = states.observe(page(running=3), now=11.0)
    assert [dict(d.changes) for d in again.deltas] == [{"last_updated": 11.0}]
    changed = states.observe(page(running=5), now=12.0)
    assert [(d.version, dict(d.changes)) for d in changed.deltas] == [
        (502, {"running": 5.0, "last_updated": 12.0})
    ]


def test_an_unreachable_runtime_marks_targets_unhealthy_once_and_recovers() -> None:
    states = tracker()
    states.observe(page(), now=10.0)
    down = states.observe(FetchFailed("cannot connect to http://10.0.0.7:8000/metrics"), now=11.0)
    assert down.problem_started == "cannot connect to http://10.0.0.7:8000/metrics"
    assert [dict(d.changes) for d in down.deltas] == [
        {"healthy": False, "health_reason": "cannot connect to http://10.0.0.7:8000/metrics"}
    ]
    still_down = states.observe(FetchFailed("cannot connect to http://10.0.0.7:8000/metrics"), 12)
    assert (still_down.problem_started, still_down.deltas, still_down.recovered) == ("", (), False)
    # The last successful read stays the age of the values, so the target is also stale.
    assert states.states[KEY].last_updated == 10.0

    back = states.observe(page(), now=13.0)
    assert back.recovered
    assert states.states[KEY].healthy
    assert states.states[KEY].health_reason == ""


def test_a_page_that_cannot_be_read_names_the_url_and_what_to_check() -> None:
    states = tracker()
    states.observe(page(), now=10.0)
    garbage = PageFetched("<html>oops</html>", models_json(), 200)
    observed = states.observe(garbage, now=11.0)
    assert observed.problem_started.startswith(f"cannot read {ENDPOINT}/metrics: ")
    assert "vLLM OpenAI-compatible server" in observed.problem_started
    assert not states.states[KEY].healthy


def test_a_dead_engine_is_reported_once_like_any_other_problem() -> None:
    states = tracker()
    dead = states.observe(page(health=503), now=10.0)
    assert "503" in dead.problem_started
    assert states.observe(page(health=503), now=11.0).problem_started == ""
    assert states.observe(page(), now=12.0).recovered


def test_an_adapter_that_disappears_from_the_model_list_is_unloaded() -> None:
    states = tracker()
    states.observe(page(adapters=("sql-lora",)), now=10.0)
    lora = TargetKey(model="sql-lora", node="n1", endpoint=ENDPOINT)
    assert states.states[lora].loaded
    gone = states.observe(page(), now=11.0)
    changes = {d.key: dict(d.changes) for d in gone.deltas}
    assert changes[lora] == {"loaded": False, "last_updated": 11.0}
    assert changes[KEY]["adapters"] == ()
    assert states.observe(page(adapters=("sql-lora",)), now=12.0).deltas
    assert states.states[lora].loaded


def test_an_error_before_any_target_is_known_is_still_reported() -> None:
    states = tracker()
    observed = states.observe(FetchFailed("cannot connect"), now=1.0)
    assert (observed.problem_started, observed.deltas) == ("cannot connect", ())

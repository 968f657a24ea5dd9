"""Mapped runtime adapters against a real HTTP server on loopback serving recorded pages."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest

from infermesh.agent.runtimes.generic.adapter import GenericAdapter
from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext, RuntimeAdapter
from infermesh.core.model import ModelState, ModelStateDelta, TargetKey
from infermesh.core.plugins import PluginHost
from tests.agent.generic.pages import body, page
from tests.agent.generic.server import recorded_runtime

pytestmark = pytest.mark.anyio

TGI_MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def ten_second_clock() -> Callable[[], float]:
    """A clock that moves 10 s per reading, so rates from successive scrapes are exact."""
    ticks: Iterator[int] = iter(range(10**9))
    return lambda: 1_700_000_000.0 + 10.0 * next(ticks)


def adapter(
    kind: str, url: str, clock: Callable[[], float] | None = None, **options: Any
) -> GenericAdapter:
    context = AdapterContext(
        node="n1", name="rt", url=url, poll_interval_s=0.05, timeout_s=0.5, options=options
    )
    if clock is None:
        return GenericAdapter(context, kind, environ={})
    return GenericAdapter(context, kind, clock=clock, environ={})


class Watcher:
    """Consumes an adapter's deltas in the background into the states an agent would hold."""

    def __init__(self, source: GenericAdapter) -> None:
        self.source = source
        self.deltas: list[ModelStateDelta] = []
        self.states: dict[TargetKey, ModelState] = {}

    async def run(self) -> None:
        async for delta in self.source.deltas():
            self.deltas.append(delta)
            old = self.states.get(delta.key, ModelState(key=delta.key))
            self.states[delta.key] = old.apply(delta)

    def state(self, model: str) -> ModelState | None:
        return self.states.get(TargetKey(model=model, node="n1", endpoint=self.source.base_url))

    def saw(self, model: str, check: Callable[[Mapping[str, Any]], bool]) -> bool:
        return any(d.key.model == model and check(d.changes) for d in self.deltas)


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    # The adapter has no event for "state became X": poll the condition, bounded by a deadline.
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def tgi_routes() -> dict[str, tuple[int, bytes | str]]:
    return {
        "/metrics": (200, page("tgi-1.prom")),
        "/v1/models": (200, body("tgi-models.json")),
        "/health": (200, b""),
    }


async def test_tgi_over_http_gives_values_then_rates_from_the_next_page() -> None:
    async with recorded_runtime(tgi_routes()) as server:
        source = adapter("tgi", server.url + "/v1", clock=ten_second_clock())
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: watcher.state(TGI_MODEL) is not None)
            first = watcher.state(TGI_MODEL)
            assert first is not None
            assert (first.running, first.waiting, first.healthy) == (8, 3, True)
            assert first.labels.runtime == "tgi"
            server.routes["/metrics"] = (200, page("tgi-2.prom"))
            await wait_for(lambda: watcher.saw(TGI_MODEL, lambda c: "prompt_tokens_per_s" in c))
            group.cancel_scope.cancel()
        await source.aclose()
    rates = [
        d.changes["prompt_tokens_per_s"]
        for d in watcher.deltas
        if "prompt_tokens_per_s" in d.changes
    ]
    assert rates[0] == pytest.approx(500.0)  # 5000 tokens over the 10 s between the scrapes
    assert source.base_url == server.url  # `/v1` is not part of the target's endpoint
    accepts = {headers.get("Accept") for path, headers in server.requests if path == "/metrics"}
    assert accepts == {"text/plain;version=0.0.4"}


async def test_a_garbage_page_marks_the_models_unhealthy_until_the_page_is_good_again() -> None:
    async with recorded_runtime(tgi_routes()) as server:
        source = adapter("tgi", server.url)
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: watcher.state(TGI_MODEL) is not None)
            server.routes["/metrics"] = (200, "<html>502 Bad Gateway</html>")
            await wait_for(lambda: not watcher.state(TGI_MODEL).healthy)  # type: ignore[union-attr]
            broken = watcher.state(TGI_MODEL)
            assert broken is not None
            assert "not a Prometheus text page" in broken.health_reason
            assert broken.running == 8  # the last good values are kept
            server.routes["/metrics"] = (200, page("tgi-2.prom"))
            await wait_for(lambda: watcher.state(TGI_MODEL).healthy)  # type: ignore[union-attr]
            group.cancel_scope.cancel()
        await source.aclose()


async def test_a_runtime_that_goes_away_is_unhealthy_with_the_url_in_the_reason() -> None:
    async with recorded_runtime(tgi_routes()) as server:
        source = adapter("tgi", server.url)
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: watcher.state(TGI_MODEL) is not None)
            server.routes["/metrics"] = (404, "metrics disabled")
            await wait_for(lambda: not watcher.state(TGI_MODEL).healthy)  # type: ignore[union-attr]
            reason = watcher.state(TGI_MODEL).health_reason  # type: ignore[union-attr]
            assert f"GET {server.url}/metrics returned HTTP 404" in reason
            assert "are TGI's metrics enabled" in reason
            group.cancel_scope.cancel()
        await source.aclose()


async def test_tfserving_checks_each_model_status_over_http() -> None:
    routes: dict[str, tuple[int, bytes | str]] = {
        "/monitoring/prometheus/metrics": (200, page("tfserving-1.prom")),
        "/v1/models/half_plus_two": (200, body("tfserving-status.json")),
    }
    async with recorded_runtime(routes) as server:
        source = adapter("tfserving", server.url, models=["half_plus_two", "gone"])
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: watcher.state("gone") is not None)
            group.cancel_scope.cancel()
        await source.aclose()
    served, gone = watcher.state("half_plus_two"), watcher.state("gone")
    assert served is not None
    assert gone is not None
    assert served.healthy
    assert served.e2e_s == pytest.approx(0.003)
    assert not gone.healthy
    assert "does not serve model 'gone'" in gone.health_reason


async def test_torchserve_reads_metrics_and_models_from_their_own_urls() -> None:
    routes: dict[str, tuple[int, bytes | str]] = {
        "/ping": (200, '{"status": "Healthy"}'),
        "/ts-metrics": (200, page("torchserve-1.prom")),
        "/ts-models": (200, body("torchserve-models.json")),
    }
    async with recorded_runtime(routes) as server:
        source = adapter(
            "torchserve",
            server.url,
            metrics_url=server.url + "/ts-metrics",
            models_url=server.url + "/ts-models",
        )
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: len(watcher.states) == 2)
            group.cancel_scope.cancel()
        await source.aclose()
    mnist = watcher.state("mnist")
    assert mnist is not None
    assert mnist.e2e_s == pytest.approx(0.05)


async def test_kind_generic_reads_the_operators_mapping(tmp_path: Path) -> None:
    mapping = tmp_path / "mine.toml"
    mapping.write_text(
        'runtime = "mine"\n[signals.waiting]\nmetric = "tgi_queue_size"\n', encoding="utf-8"
    )
    async with recorded_runtime(tgi_routes()) as server:
        source = adapter("generic", server.url, mapping=str(mapping), models=["m"])
        watcher = Watcher(source)
        async with anyio.create_task_group() as group:
            group.start_soon(watcher.run)
            await wait_for(lambda: watcher.state("m") is not None)
            group.cancel_scope.cancel()
        await source.aclose()
    state = watcher.state("m")
    assert state is not None
    assert (state.waiting, state.running, state.labels.runtime) == (3, 0.0, "mine")


def test_each_mapped_kind_is_registered_by_the_agent_plugin(tmp_path: Path) -> None:
    host = PluginHost.load(allow=["agent"])
    assert host.failures == []
    factories = host.runtime_adapters()
    mapping = tmp_path / "m.toml"
    mapping.write_text('runtime = "m"\n', encoding="utf-8")
    options: dict[str, dict[str, Any]] = {
        "tfserving": {"models": ["a"]},
        "generic": {"mapping": str(mapping), "models": ["a"]},
    }
    for kind in ("tgi", "sglang", "torchserve", "tfserving", "ovms", "generic"):
        context = AdapterContext(
            node="n1", name="rt", url="http://h:1", options=options.get(kind, {})
        )
        assert isinstance(factories[kind](context), RuntimeAdapter)


def test_torchserve_defaults_to_its_metrics_and_management_ports() -> None:
    source = adapter("torchserve", "http://ts.local:8080")
    assert source.metrics_url == "http://ts.local:8082/metrics"
    assert source.models_url == "http://ts.local:8081/models"
    assert source.health_url == "http://ts.local:8080/ping"


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("generic", {}, "kind generic needs options.mapping"),
        ("generic", {"mapping": "/nonexistent/m.toml"}, "'/nonexistent/m.toml' cannot be read"),
        ("tgi", {"mapping": "x.toml"}, "options.mapping is for kind generic"),
        ("tfserving", {}, "TF Serving has no model list to read; set options.models"),
        ("tgi", {"modles": ["a"]}, "unknown option(s) modles"),
        ("tgi", {"models": "a"}, "options.models must be a list of model names"),
        ("tgi", {"max_num_seqs": 0}, "options.max_num_seqs must be an integer >= 1"),
        ("tgi", {"api_key_env": "INFERMESH_TEST_UNSET"}, "INFERMESH_TEST_UNSET is not set"),
    ],
)
def test_bad_runtime_settings_are_config_errors_naming_the_runtime(
    kind: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        adapter(kind, "http://h:1", **options)
    assert message in str(caught.value)
    assert f"runtime 'rt' (kind {kind})" in str(caught.value)


def test_a_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be an http:// or https:// base URL"):
        adapter("tgi", "h:1")

"""Every plugin example in docs/plugins.md is a complete module that loads and does what the
page says: each registers through its hook and satisfies its contract."""

from __future__ import annotations

import re
import types
from pathlib import Path

import anyio
import pytest

from infermesh.core.contracts import (
    AdapterContext,
    GpuAdapter,
    RuntimeAdapter,
    Scorer,
    TargetView,
    Transport,
    TransportContext,
)
from infermesh.core.model import ModelState, RequestFeatures, TargetKey
from infermesh.core.plugins import PluginHost
from infermesh.core.policy import PolicyStore, PolicyStoreContext

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def plugin_examples() -> list[str]:
    return [code for code in BLOCK.findall(DOC.read_text()) if "@hookimpl" in code]


def load(code: str) -> PluginHost:
    module = types.ModuleType("docs_plugin_example")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return PluginHost.load(entry_point_list=[], extra=[("example", module)])


def test_the_page_has_an_example_for_every_hook() -> None:
    hooks = {hook for code in plugin_examples() for hook in re.findall(r"def (\w+)\(", code)}
    assert {
        "infermesh_register_runtime_adapters",
        "infermesh_register_gpu_adapters",
        "infermesh_register_scorers",
        "infermesh_register_transports",
        "infermesh_register_policy_stores",
        "infermesh_register_commands",
    } <= hooks


@pytest.mark.parametrize("code", plugin_examples(), ids=lambda code: code.splitlines()[0][3:40])
def test_each_example_registers_objects_that_satisfy_their_contracts(code: str) -> None:
    host = load(code)
    registered = {kind: names for kind, names in host.registrations().items() if names}
    assert registered, "the example registered nothing"
    context = AdapterContext(node="n1", name="rt", url="http://127.0.0.1:1", timeout_s=0.5)
    for runtime in host.runtime_adapters().values():
        assert isinstance(runtime(context), RuntimeAdapter)
    for gpu in host.gpu_adapters().values():
        assert isinstance(gpu(context), GpuAdapter)
    for transport in host.transports().values():
        assert isinstance(transport(TransportContext()), Transport)
    store_context = PolicyStoreContext(node="n1", data_dir="/nonexistent")
    for store in host.policy_stores().values():
        assert isinstance(store(store_context), PolicyStore)
    key = TargetKey(model="m", node="n", endpoint="http://127.0.0.1:8000")
    idle, busy = (
        TargetView(state=ModelState(key=key)),
        TargetView(state=ModelState(key=key, waiting=3)),
    )
    for scorer in host.scorers().values():
        assert isinstance(scorer, Scorer)
        idle_result, busy_result = scorer.score(RequestFeatures(model="m"), [idle, busy])
        assert idle_result.score > busy_result.score


@pytest.mark.anyio
async def test_the_runtime_example_reports_an_unreachable_server_as_unhealthy() -> None:
    [code] = [code for code in plugin_examples() if "infermesh_register_runtime_adapters" in code]
    factory = load(code).runtime_adapters()["acme-stats"]
    adapter = factory(AdapterContext(node="n1", name="rt", url="http://127.0.0.1:1", timeout_s=1))
    with anyio.fail_after(20):
        async for delta in adapter.deltas():
            first = delta
            break
    await adapter.aclose()
    assert first.changes["healthy"] is False
    assert first.changes["health_reason"].startswith("GET /stats failed: ")

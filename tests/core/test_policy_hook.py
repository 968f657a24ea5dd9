"""The policy-store hook: a plugin's backend reaches `PluginHost.policy_stores()` and
`infermesh plugins`; a broken registration is reported by name and skipped."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from infermesh.core.cli import main
from infermesh.core.plugins import PluginHost
from infermesh.core.policy import PolicyStore, PolicyStoreContext

if TYPE_CHECKING:
    from tests.core.conftest import PluginDistributions

STORE_PLUGIN = """
from infermesh.core import hookimpl
from infermesh.core.policy import PolicySet, PolicyStoreStatus

class MemoryStore:
    def __init__(self, context):
        self.context = context
        self.policy = PolicySet()
    async def start(self):
        pass
    async def get(self):
        return self.policy
    async def submit(self, command):
        self.policy = self.policy.apply(command)
        return self.policy
    async def watch(self):
        yield self.policy
    async def status(self):
        return PolicyStoreStatus("single", None, (), self.policy.revision)
    async def aclose(self):
        pass

@hookimpl
def infermesh_register_policy_stores(register):
    register("memory", MemoryStore)
"""

BROKEN_STORE_PLUGIN = """
from infermesh.core import hookimpl

@hookimpl
def infermesh_register_policy_stores(register):
    register("nothing", 42)
"""


@pytest.fixture
def store_installed(plugin_dists: PluginDistributions) -> None:
    plugin_dists.add(
        "infermesh-memory", {"memory": "im_test_memory"}, {"im_test_memory": STORE_PLUGIN}
    )
    plugin_dists.add(
        "infermesh-nothing",
        {"nothing": "im_test_nothing"},
        {"im_test_nothing": BROKEN_STORE_PLUGIN},
    )


@pytest.mark.anyio
@pytest.mark.usefixtures("store_installed")
async def test_a_registered_policy_store_is_built_by_its_factory() -> None:
    host = PluginHost.load(allow=["memory"])
    assert list(host.policy_stores()) == ["memory"]
    assert host.registrations()["policy stores"] == {"memory": "memory"}
    store = host.policy_stores()["memory"](PolicyStoreContext(node="n1", data_dir="/nowhere"))
    assert isinstance(store, PolicyStore)
    await store.start()
    assert (await store.get()).revision == 0


@pytest.mark.usefixtures("store_installed")
def test_a_policy_store_that_is_not_callable_is_reported_and_skipped() -> None:
    host = PluginHost.load(allow=["memory", "nothing"])
    assert list(host.policy_stores()) == ["memory"]
    [failure] = host.failures
    assert failure.name == "nothing"
    assert failure.error == "policy store 'nothing' factory is not callable (got int)"


@pytest.mark.usefixtures("store_installed")
def test_infermesh_plugins_lists_policy_stores(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERMESH_PLUGINS", "memory")
    with pytest.raises(SystemExit) as exited:
        main(["plugins"])
    assert exited.value.code in (0, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines[lines.index("policy stores:") + 1] == "  memory                   from memory"

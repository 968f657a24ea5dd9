"""Plugin loading: real distributions discovered through the `infermesh` entry-point group.

Each test installs tiny distributions on disk (see `plugin_dists` in conftest.py) and loads them
with an allow list so that the workspace's own plugins do not take part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest

from infermesh.core import hookimpl
from infermesh.core.contracts import AdapterContext, ScoreResult, TargetView, TransportContext
from infermesh.core.hookspecs import RegisterScorer
from infermesh.core.model import RequestFeatures
from infermesh.core.plugins import PluginError, PluginFailure, PluginHost, plugin_selection_from_env

if TYPE_CHECKING:
    from tests.core.conftest import PluginDistributions

SCORER_PLUGIN = """
from infermesh.core import hookimpl
from infermesh.core.contracts import ScoreResult

class LowestQueue:
    name = "lowest-queue"
    default_weight = 1.5

    def score(self, request, targets):
        return [ScoreResult(1.0 / (1.0 + t.state.waiting), "queue") for t in targets]

@hookimpl
def infermesh_register_scorers(register):
    register(LowestQueue())
"""

EVERY_HOOK_PLUGIN = """
import click
from infermesh.core import hookimpl

class Adapter:
    def __init__(self, context):
        self.context = context
    async def deltas(self):
        return
        yield
    async def aclose(self):
        pass

class Transport:
    def __init__(self, context):
        self.context = context
    async def request(self, method, url, headers, body):
        raise NotImplementedError
    async def aclose(self):
        pass

@click.command("hello")
def hello():
    click.echo("hello from a plugin")

@hookimpl
def infermesh_register_runtime_adapters(register):
    register("fake-runtime", Adapter)

@hookimpl
def infermesh_register_gpu_adapters(register):
    register("fake-gpu", Adapter)

@hookimpl
def infermesh_register_transports(register):
    register("fake-http", Transport)

@hookimpl
def infermesh_register_commands(register):
    register(hello)
"""


CORE_SCORERS = {
    "queue": "core",
    "kv": "core",
    "prefix": "core",
    "net_penalty": "core",
    "gpu_health": "core",
}
"""The built-in scorers core's own plugin registers whenever it is loaded."""


def registrations_beyond_core(host: PluginHost) -> dict[str, dict[str, str]]:
    """`host.registrations()` without core's built-in scorers, after checking they are there."""
    registrations = host.registrations()
    scorers = dict(registrations["scorers"])
    if "core" in host.plugin_names:
        assert {name: scorers.pop(name, None) for name in CORE_SCORERS} == CORE_SCORERS
    return {**registrations, "scorers": scorers}


def scorers_beyond_core(host: PluginHost) -> dict[str, object]:
    """`host.scorers()` without core's built-in scorers, after checking core registered them."""
    registrations_beyond_core(host)
    return {n: s for n, s in host.scorers().items() if n not in CORE_SCORERS}


def install_scorer(dists: PluginDistributions, plugin: str = "queue_scorer") -> None:
    dists.add(
        f"infermesh-{plugin}", {plugin: f"im_test_{plugin}"}, {f"im_test_{plugin}": SCORER_PLUGIN}
    )


def test_scorer_from_an_installed_distribution_is_discovered(
    plugin_dists: PluginDistributions,
) -> None:
    install_scorer(plugin_dists)
    host = PluginHost.load(allow=["queue_scorer"])
    scorer = host.scorers()["lowest-queue"]
    assert scorer.default_weight == 1.5
    assert host.plugin_names == ["core", "queue_scorer"]
    assert host.registrations()["scorers"]["lowest-queue"] == "queue_scorer"
    assert host.origins["queue_scorer"] == "im_test_queue_scorer (infermesh-queue_scorer 0.1.0)"
    assert host.failures == []


def test_every_register_hook_reaches_its_typed_accessor(plugin_dists: PluginDistributions) -> None:
    plugin_dists.add(
        "infermesh-every-hook", {"every": "im_test_every"}, {"im_test_every": EVERY_HOOK_PLUGIN}
    )
    host = PluginHost.load(allow=["every"])
    context = AdapterContext(node="n", name="r", url="http://127.0.0.1:1")
    assert host.runtime_adapters()["fake-runtime"](context).context is context  # type: ignore[attr-defined]
    assert "fake-gpu" in host.gpu_adapters()
    assert host.transports()["fake-http"](TransportContext()) is not None
    assert sorted(host.commands()) == ["hello", "plugins"]
    assert registrations_beyond_core(host) == {
        "runtime adapters": {"fake-runtime": "every"},
        "GPU adapters": {"fake-gpu": "every"},
        "scorers": {},
        "transports": {"fake-http": "every"},
        "policy stores": {},
        "commands": {"hello": "every", "plugins": "core"},
    }


def test_broken_plugin_is_reported_by_name_and_skipped(plugin_dists: PluginDistributions) -> None:
    install_scorer(plugin_dists)
    plugin_dists.add(
        "infermesh-broken",
        {"broken": "im_test_broken"},
        {"im_test_broken": "import not_installed_anywhere\n"},
    )
    host = PluginHost.load(allow=["queue_scorer", "broken"])
    assert host.failures == [
        PluginFailure(
            name="broken",
            value="im_test_broken",
            error="ModuleNotFoundError: No module named 'not_installed_anywhere'",
        )
    ]
    assert "broken" not in host.plugin_names
    assert "lowest-queue" in host.scorers()


def test_broken_plugin_is_fatal_when_strict(plugin_dists: PluginDistributions) -> None:
    plugin_dists.add(
        "infermesh-broken",
        {"broken": "im_test_broken"},
        {"im_test_broken": "raise RuntimeError('boom')\n"},
    )
    with pytest.raises(
        PluginError, match=r"plugin 'broken' \(im_test_broken\) failed to load: RuntimeError: boom"
    ):
        PluginHost.load(allow=["broken"], strict=True)


def test_entry_point_to_a_missing_attribute_is_a_broken_plugin(
    plugin_dists: PluginDistributions,
) -> None:
    plugin_dists.add("infermesh-attr", {"attr": "im_test_attr:plugin"}, {"im_test_attr": "x = 1\n"})
    host = PluginHost.load(allow=["attr"])
    assert [(f.name, f.value) for f in host.failures] == [("attr", "im_test_attr:plugin")]
    assert "AttributeError" in host.failures[0].error


def test_allow_list_loads_only_the_named_plugins_and_core(
    plugin_dists: PluginDistributions,
) -> None:
    install_scorer(plugin_dists, "first")
    install_scorer(plugin_dists, "second")
    host = PluginHost.load(allow=["second"])
    assert host.plugin_names == ["core", "second"]
    assert "first" in host.skipped


def test_block_list_wins_over_everything(plugin_dists: PluginDistributions) -> None:
    install_scorer(plugin_dists, "first")
    host = PluginHost.load(allow=["first", "core"], block=["first", "core"])
    assert host.plugin_names == []
    assert {"first", "core"} <= set(host.skipped)


def test_selection_names_that_match_no_plugin_are_reported(
    plugin_dists: PluginDistributions,
) -> None:
    install_scorer(plugin_dists, "first")
    host = PluginHost.load(allow=["first", "frist"], block=["nothing"])
    assert host.unmatched_selection == ["frist", "nothing"]


def test_selection_comes_from_comma_separated_environment_variables() -> None:
    environ = {"INFERMESH_PLUGINS": "vllm, core,", "INFERMESH_PLUGINS_BLOCK": "dcgm"}
    assert plugin_selection_from_env(environ) == (["vllm", "core"], ["dcgm"])
    assert plugin_selection_from_env({}) == ([], [])


MISSPELLED = """
from infermesh.core import hookimpl

@hookimpl
def infermesh_register_scorer(register):
    pass
"""


def test_misspelled_hook_is_caught_by_check_pending(plugin_dists: PluginDistributions) -> None:
    plugin_dists.add("infermesh-typo", {"typo": "im_test_typo"}, {"im_test_typo": MISSPELLED})
    host = PluginHost.load(allow=["typo"])
    assert [f.name for f in host.failures] == ["typo"]
    assert host.failures[0].error == (
        "implements unknown hook 'infermesh_register_scorer' "
        "(did you mean 'infermesh_register_scorers'?); "
        "the hooks are listed in infermesh.core.hookspecs"
    )
    assert "typo" not in host.plugin_names
    with pytest.raises(
        PluginError, match=r"plugin 'typo' .*unknown hook 'infermesh_register_scorer'"
    ):
        PluginHost.load(allow=["typo"], strict=True)


def test_misspelled_hook_in_a_directly_added_plugin_is_always_an_error(
    plugin_dists: PluginDistributions,
) -> None:
    plugin_dists.add("infermesh-typo", {}, {"im_test_typo": MISSPELLED})
    import im_test_typo  # type: ignore[import-not-found]

    with pytest.raises(PluginError, match="unknown hook 'infermesh_register_scorer'"):
        PluginHost.load(block=["core"], entry_point_list=[], extra=[("typo", im_test_typo)])


def test_hook_without_the_hookimpl_decorator_is_reported(plugin_dists: PluginDistributions) -> None:
    code = "def infermesh_register_scorers(register):\n    pass\n"
    plugin_dists.add("infermesh-bare", {"bare": "im_test_bare"}, {"im_test_bare": code})
    host = PluginHost.load(allow=["bare"])
    assert host.failures[0].error == (
        "infermesh_register_scorers is not decorated with @infermesh.core.hookimpl"
    )


def test_hook_with_a_wrong_argument_name_is_reported(plugin_dists: PluginDistributions) -> None:
    code = """
    from infermesh.core import hookimpl

    @hookimpl
    def infermesh_register_scorers(reg):
        pass
    """
    plugin_dists.add("infermesh-args", {"args": "im_test_args"}, {"im_test_args": code})
    host = PluginHost.load(allow=["args"])
    assert host.failures[0].name == "args"
    assert (
        "Argument(s) {'reg'} are declared in the hookimpl but can not be found in the hookspec"
        in (host.failures[0].error)
    )


def test_duplicate_registration_names_both_plugins(plugin_dists: PluginDistributions) -> None:
    install_scorer(plugin_dists, "alpha")
    install_scorer(plugin_dists, "beta")
    with pytest.raises(PluginError) as err:
        PluginHost.load(allow=["alpha", "beta"])
    assert str(err.value) == (
        "scorer 'lowest-queue' is registered by both plugin 'alpha' and plugin 'beta'; "
        "block one with INFERMESH_PLUGINS_BLOCK=<plugin name>"
    )


def test_duplicate_command_name_names_both_plugins(plugin_dists: PluginDistributions) -> None:
    code = """
    import click
    from infermesh.core import hookimpl

    @hookimpl
    def infermesh_register_commands(register):
        register(click.Command("plugins"))
    """
    plugin_dists.add("infermesh-clash", {"clash": "im_test_clash"}, {"im_test_clash": code})
    with pytest.raises(
        PluginError,
        match="command 'plugins' is registered by both plugin 'clash' and plugin 'core'",
    ):
        PluginHost.load(allow=["clash"])


NOT_A_SCORER = """
from infermesh.core import hookimpl

class Unweighted:
    name = "unweighted"

    def score(self, request, targets):
        return []

@hookimpl
def infermesh_register_scorers(register):
    register(Unweighted())
"""


def test_scorer_that_does_not_satisfy_the_protocol_is_rejected(
    plugin_dists: PluginDistributions,
) -> None:
    plugin_dists.add("infermesh-bad-scorer", {"bad": "im_test_bad"}, {"im_test_bad": NOT_A_SCORER})
    host = PluginHost.load(allow=["bad"])
    assert host.failures == [
        PluginFailure(
            "bad",
            "im_test_bad",
            "scorer 'unweighted' (Unweighted) does not implement the Scorer protocol: "
            "missing default_weight",
        )
    ]
    assert scorers_beyond_core(host) == {}
    with pytest.raises(PluginError, match=r"plugin 'bad' .*does not implement the Scorer protocol"):
        PluginHost.load(allow=["bad"], strict=True)


@pytest.mark.parametrize(
    ("registration", "error"),
    [
        (
            "register(Weighted(-1))",
            "scorer 'weighted' default_weight must be a number >= 0, got -1",
        ),
        (
            "register(Weighted('2'))",
            "scorer 'weighted' default_weight must be a number >= 0, got '2'",
        ),
        ("register(Weighted(1)); register(Weighted(1))", "registered scorer 'weighted' twice"),
        ("register('weighted', Weighted(1))", "TypeError"),
        ("raise KeyError('oops')", "infermesh_register_scorers raised KeyError: 'oops'"),
    ],
)
def test_invalid_registrations_skip_the_plugin_with_a_reason(
    plugin_dists: PluginDistributions, registration: str, error: str
) -> None:
    code = f"""
from infermesh.core import hookimpl

class Weighted:
    name = "weighted"
    def __init__(self, weight):
        self.default_weight = weight
    def score(self, request, targets):
        return []

@hookimpl
def infermesh_register_scorers(register):
    {registration}
"""
    plugin_dists.add("infermesh-invalid", {"invalid": "im_test_invalid"}, {"im_test_invalid": code})
    host = PluginHost.load(allow=["invalid"])
    assert [f.name for f in host.failures] == ["invalid"]
    assert error in host.failures[0].error
    assert scorers_beyond_core(host) == {}


def test_a_plugin_failing_one_hook_loses_all_its_registrations(
    plugin_dists: PluginDistributions,
) -> None:
    code = (
        EVERY_HOOK_PLUGIN
        + "\n@hookimpl\ndef infermesh_register_scorers(register):\n    register(object())\n"
    )
    plugin_dists.add("infermesh-half", {"half": "im_test_half"}, {"im_test_half": code})
    host = PluginHost.load(allow=["half"])
    assert host.failures[0].error == "registered a scorer with an invalid name None"
    assert host.runtime_adapters() == {}
    assert list(host.commands()) == ["plugins"]


def test_non_callable_factory_and_non_command_are_rejected(
    plugin_dists: PluginDistributions,
) -> None:
    code = """
    from infermesh.core import hookimpl

    @hookimpl
    def infermesh_register_transports(register):
        register("http", "not a factory")
    """
    plugin_dists.add("infermesh-factory", {"factory": "im_test_factory"}, {"im_test_factory": code})
    host = PluginHost.load(allow=["factory"])
    assert host.failures[0].error == "transport 'http' factory is not callable (got str)"


def test_async_hook_implementation_is_rejected(plugin_dists: PluginDistributions) -> None:
    code = """
    from infermesh.core import hookimpl

    @hookimpl
    async def infermesh_register_commands(register):
        pass
    """
    plugin_dists.add("infermesh-async", {"asyncplug": "im_test_async"}, {"im_test_async": code})
    host = PluginHost.load(allow=["asyncplug"])
    assert host.failures[0].error == (
        "infermesh_register_commands must be a plain function (it registers, it does not run)"
    )


def test_each_hook_runs_once_however_often_registrations_are_read(
    plugin_dists: PluginDistributions,
) -> None:
    code = """
    from infermesh.core import hookimpl
    from im_test_scorer_module import LowestQueue

    calls = []

    @hookimpl
    def infermesh_register_scorers(register):
        calls.append(1)
        register(LowestQueue())
    """
    plugin_dists.add(
        "infermesh-counted",
        {"counted": "im_test_counted"},
        {"im_test_counted": code, "im_test_scorer_module": SCORER_PLUGIN.replace("@hookimpl", "")},
    )
    host = PluginHost.load(allow=["counted"])
    first, second = host.scorers(), host.scorers()
    host.registrations()
    assert first["lowest-queue"] is second["lowest-queue"]
    import im_test_counted  # type: ignore[import-not-found]

    assert im_test_counted.calls == [1]


class ConstantScorer:
    name = "constant"
    default_weight = 1.0

    def score(
        self, request: RequestFeatures, targets: Sequence[TargetView]
    ) -> Sequence[ScoreResult]:
        return [ScoreResult(0.5, "constant") for _ in targets]


class DirectPlugin:
    @hookimpl
    def infermesh_register_scorers(self, register: RegisterScorer) -> None:
        register(ConstantScorer())


class UndecoratedPlugin:
    def infermesh_register_scorers(self, register: RegisterScorer) -> None:
        register(ConstantScorer())


def test_directly_added_plugins_take_part_like_entry_points() -> None:
    host = PluginHost.load(entry_point_list=[], extra=[("direct", DirectPlugin())])
    assert host.registrations()["scorers"] == {"constant": "direct"}


def test_a_broken_directly_added_plugin_is_always_an_error() -> None:
    with pytest.raises(PluginError, match=r"not decorated with @infermesh\.core\.hookimpl"):
        PluginHost.load(entry_point_list=[], extra=[("undecorated", UndecoratedPlugin())])


def test_a_directly_added_plugin_cannot_take_an_installed_plugins_name(
    plugin_dists: PluginDistributions,
) -> None:
    install_scorer(plugin_dists, "taken")
    with pytest.raises(PluginError, match="a plugin named 'taken' is already registered"):
        PluginHost.load(allow=["taken"], extra=[("taken", DirectPlugin())])


def test_two_distributions_declaring_one_plugin_name_load_only_the_first(
    plugin_dists: PluginDistributions,
) -> None:
    plugin_dists.add("infermesh-one", {"same": "im_test_one"}, {"im_test_one": SCORER_PLUGIN})
    plugin_dists.add("infermesh-two", {"same": "im_test_two"}, {"im_test_two": SCORER_PLUGIN})
    host = PluginHost.load(allow=["same"])
    assert registrations_beyond_core(host)["scorers"] == {"lowest-queue": "same"}
    assert len(host.failures) == 1
    assert host.failures[0].error.startswith(
        "entry point name 'same' is also declared for im_test_"
    )

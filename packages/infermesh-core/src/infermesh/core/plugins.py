"""Plugin discovery and registration: the `infermesh` entry-point group, loaded defensively.

`PluginHost.load` imports each selected entry point, validates its hooks (`check_pending`, hooks
left undecorated), and calls every register-style hook once, validating what it registers. A
plugin that fails any step is reported by name with its error and skipped as a whole (fatal when
`strict`). A name registered by two plugins is always fatal and names both. Never imports a
plugin twice and never does a plugin's I/O.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import Any, TypeVar

import attrs
import click
import pluggy

from infermesh.core import hookspecs
from infermesh.core.contracts import (
    GpuAdapterFactory,
    RuntimeAdapterFactory,
    Scorer,
    TransportFactory,
)
from infermesh.core.policy import PolicyStoreFactory

__all__ = [
    "ALWAYS_ALLOWED",
    "ENV_ALLOW",
    "ENV_BLOCK",
    "PluginError",
    "PluginFailure",
    "PluginHost",
    "plugin_selection_from_env",
]

ENV_ALLOW = "INFERMESH_PLUGINS"
ENV_BLOCK = "INFERMESH_PLUGINS_BLOCK"
# Core's own plugin (the `infermesh plugins` command) is loaded even when an allow list omits it;
# it can still be blocked.
ALWAYS_ALLOWED = frozenset({"core"})

T = TypeVar("T")


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why (shown by `infermesh plugins` and as a CLI warning)."""

    name: str
    value: str
    """The entry point's target (`module:attr`) or, for directly added plugins, their repr."""
    error: str


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def plugin_selection_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[list[str], list[str]]:
    """(allow, block) from `INFERMESH_PLUGINS` and `INFERMESH_PLUGINS_BLOCK` (comma lists)."""
    env = os.environ if environ is None else environ
    return _split(env.get(ENV_ALLOW)), _split(env.get(ENV_BLOCK))


# --------------------------------------------------------------------------- what can be registered


def _check_factory(noun: str) -> Callable[[str, Any], str | None]:
    def check(name: str, obj: Any) -> str | None:
        if not callable(obj):
            return f"{noun} {name!r} factory is not callable (got {type(obj).__name__})"
        return None

    return check


def _check_scorer(name: str, obj: Any) -> str | None:
    if not isinstance(obj, Scorer):
        missing = [a for a in ("name", "default_weight", "score") if not hasattr(obj, a)]
        return (
            f"scorer {name!r} ({type(obj).__name__}) does not implement the Scorer protocol: "
            f"missing {', '.join(missing)}"
        )
    weight = obj.default_weight
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
        return f"scorer {name!r} default_weight must be a number >= 0, got {weight!r}"
    if not callable(obj.score):
        return f"scorer {name!r} score is not callable"
    return None


def _check_command(name: str, obj: Any) -> str | None:
    if not isinstance(obj, click.Command):
        return f"command {name!r} is not a click.Command (got {type(obj).__name__})"
    return None


@attrs.frozen
class _Kind:
    """One register-style hook: what it registers and how a registration is checked."""

    title: str
    noun: str
    hook: str
    named: bool
    """register(name, obj) when True; register(obj) with the name taken from `obj.name` else."""
    check: Callable[[str, Any], str | None]


_KINDS = (
    _Kind(
        "runtime adapters",
        "runtime adapter",
        "infermesh_register_runtime_adapters",
        True,
        _check_factory("runtime adapter"),
    ),
    _Kind(
        "GPU adapters",
        "GPU adapter",
        "infermesh_register_gpu_adapters",
        True,
        _check_factory("GPU adapter"),
    ),
    _Kind("scorers", "scorer", "infermesh_register_scorers", False, _check_scorer),
    _Kind(
        "transports",
        "transport",
        "infermesh_register_transports",
        True,
        _check_factory("transport"),
    ),
    _Kind(
        "policy stores",
        "policy store",
        "infermesh_register_policy_stores",
        True,
        _check_factory("policy store"),
    ),
    _Kind("commands", "command", "infermesh_register_commands", False, _check_command),
)
_HOOK_NAMES = frozenset(kind.hook for kind in _KINDS)


class _Rejected(Exception):
    """Internal: a plugin failed a step; carries the message for its PluginFailure."""


def _call_hook(kind: _Kind, function: Callable[..., Any]) -> list[tuple[str, Any]]:
    """Run one plugin's implementation of a register-style hook; return its registrations."""
    registered: list[tuple[str, Any]] = []

    def add(name: Any, obj: Any) -> None:
        if not isinstance(name, str) or not name:
            raise _Rejected(f"registered a {kind.noun} with an invalid name {name!r}")
        problem = kind.check(name, obj)
        if problem is not None:
            raise _Rejected(problem)
        if any(seen == name for seen, _ in registered):
            raise _Rejected(f"registered {kind.noun} {name!r} twice")
        registered.append((name, obj))

    def register_named(name: str, obj: Any) -> None:
        add(name, obj)

    def register_object(obj: Any) -> None:
        add(getattr(obj, "name", None), obj)

    if inspect.iscoroutinefunction(function) or inspect.isgeneratorfunction(function):
        raise _Rejected(f"{kind.hook} must be a plain function (it registers, it does not run)")
    try:
        function(register_named if kind.named else register_object)
    except _Rejected:
        raise
    except Exception as exc:
        raise _Rejected(f"{kind.hook} raised {type(exc).__name__}: {exc}") from exc
    return registered


class PluginHost:
    """The loaded plugins of one process, with typed accessors for what they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        """Plugins that were skipped because they are broken."""
        self.skipped: list[str] = []
        """Entry-point names left out by the allow/block lists."""
        self.unmatched_selection: list[str] = []
        """Names in the allow/block lists that match no installed entry point (typos?)."""
        self.origins: dict[str, str] = {}
        """Plugin name -> where it came from (`module (distribution version)`)."""
        self._registered: dict[str, dict[str, tuple[str, Any]]] = {
            kind.title: {} for kind in _KINDS
        }

    @classmethod
    def load(
        cls,
        *,
        allow: Sequence[str] = (),
        block: Sequence[str] = (),
        strict: bool = False,
        extra: Iterable[tuple[str, object]] = (),
        entry_point_list: Iterable[EntryPoint] | None = None,
    ) -> PluginHost:
        """Load every `infermesh` entry point that passes the allow/block lists, plus `extra`.

        `allow` (when not empty) names the only entry points loaded, besides `core`; `block`
        names entry points never loaded. A broken entry-point plugin is recorded in `failures`
        and skipped, or raises PluginError when `strict`. `extra` are `(name, module_or_object)`
        pairs registered directly (tests, embedding); a broken extra always raises PluginError.
        """
        host = cls()
        eps = (
            entry_points(group=hookspecs.PROJECT) if entry_point_list is None else entry_point_list
        )
        eps = sorted(eps, key=lambda e: e.name)
        names = {ep.name for ep in eps}
        host.unmatched_selection = sorted(set(allow).union(block) - names)
        strictness: dict[str, bool] = {}
        values: dict[str, str] = {}
        for ep in eps:
            if (allow and ep.name not in allow and ep.name not in ALWAYS_ALLOWED) or (
                ep.name in block
            ):
                host.skipped.append(ep.name)
                continue
            if ep.name in values:
                if ep.value != values[ep.name]:
                    host._fail(
                        ep.name,
                        ep.value,
                        f"entry point name {ep.name!r} is also declared for {values[ep.name]}",
                        strict,
                    )
                continue
            values[ep.name] = ep.value
            try:
                plugin = ep.load()
                host._register(ep.name, plugin)
            except Exception as exc:
                host._fail(ep.name, ep.value, _describe(exc), strict, exc)
                continue
            strictness[ep.name] = strict
            dist = getattr(ep, "dist", None)
            origin = f" ({dist.name} {dist.version})" if dist is not None else ""
            host.origins[ep.name] = ep.value + origin
        for name, plugin in extra:
            value = getattr(plugin, "__name__", repr(plugin))
            try:
                host._register(name, plugin)
            except Exception as exc:
                host._fail(name, value, _describe(exc), True, exc)
            strictness[name] = True
            values[name] = value
            host.origins[name] = value
        host._check_pending(strictness, values)
        host._collect(strictness, values)
        return host

    # ------------------------------------------------------------------ loading steps

    def _fail(
        self,
        name: str,
        value: str,
        error: str,
        fatal: bool,
        cause: BaseException | None = None,
        *,
        registered: bool = False,
    ) -> None:
        """Record (or, when `fatal`, raise) a plugin failure; unregister it if `registered`."""
        if registered:
            self.pm.unregister(name=name)
        self.origins.pop(name, None)
        if fatal:
            raise PluginError(f"plugin {name!r} ({value}) failed to load: {error}") from cause
        self.failures.append(PluginFailure(name, value, error))

    def _register(self, name: str, plugin: object) -> None:
        if self.pm.has_plugin(name):
            raise _Rejected(f"a plugin named {name!r} is already registered")
        self.pm.register(plugin, name=name)
        for hook in sorted(_HOOK_NAMES):
            function = getattr(plugin, hook, None)
            if callable(function) and self.pm.parse_hookimpl_opts(plugin, hook) is None:
                self.pm.unregister(name=name)
                raise _Rejected(f"{hook} is not decorated with @infermesh.core.hookimpl")

    def _check_pending(self, strictness: Mapping[str, bool], values: Mapping[str, str]) -> None:
        """Reject plugins implementing hooks that no spec declares (misspelled names)."""
        while True:
            try:
                self.pm.check_pending()
                return
            except pluggy.PluginValidationError as exc:
                name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
                unknown = sorted(
                    caller.name
                    for caller in self.pm.get_hookcallers(exc.plugin) or ()
                    if not caller.has_spec()
                )
                hints = []
                for hook in unknown:
                    close = difflib.get_close_matches(hook, sorted(_HOOK_NAMES), n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    hints.append(f"{hook!r}{hint}")
                error = (
                    f"implements unknown hook {', '.join(hints)}; "
                    "the hooks are listed in infermesh.core.hookspecs"
                )
                self._fail(
                    name,
                    values.get(name, name),
                    error,
                    strictness.get(name, True),
                    exc,
                    registered=True,
                )

    def _collect(self, strictness: Mapping[str, bool], values: Mapping[str, str]) -> None:
        """Call every register-style hook once per plugin; merge; reject duplicates."""
        staged: dict[str, list[tuple[_Kind, str, Any]]] = {}
        for plugin_name, plugin in sorted(self.pm.list_name_plugin()):
            try:
                for kind in _KINDS:
                    impls = getattr(self.pm.hook, kind.hook).get_hookimpls()
                    for impl in impls:
                        if impl.plugin is plugin:
                            for name, obj in _call_hook(kind, impl.function):
                                staged.setdefault(plugin_name, []).append((kind, name, obj))
            except _Rejected as exc:
                staged.pop(plugin_name, None)
                self._fail(
                    plugin_name,
                    values.get(plugin_name, plugin_name),
                    str(exc),
                    strictness.get(plugin_name, True),
                    exc.__cause__,
                    registered=True,
                )
        for plugin_name, registrations in staged.items():
            for kind, name, obj in registrations:
                found = self._registered[kind.title]
                if name in found:
                    raise PluginError(
                        f"{kind.noun} {name!r} is registered by both plugin {found[name][0]!r} "
                        f"and plugin {plugin_name!r}; block one with {ENV_BLOCK}=<plugin name>"
                    )
                found[name] = (plugin_name, obj)

    # ------------------------------------------------------------------ what plugins registered

    @property
    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def _plain(self, title: str) -> dict[str, Any]:
        return {name: obj for name, (_, obj) in self._registered[title].items()}

    def runtime_adapters(self) -> dict[str, RuntimeAdapterFactory]:
        """Runtime kind (as written in `[[runtimes]] kind = ...`) -> adapter factory."""
        return self._plain("runtime adapters")

    def gpu_adapters(self) -> dict[str, GpuAdapterFactory]:
        """GPU source kind (as written in `[[gpus]] kind = ...`) -> adapter factory."""
        return self._plain("GPU adapters")

    def scorers(self) -> dict[str, Scorer]:
        """Scorer name -> scorer, every one checked against the Scorer protocol."""
        return self._plain("scorers")

    def transports(self) -> dict[str, TransportFactory]:
        """Transport name (`openai-http`, ...) -> transport factory."""
        return self._plain("transports")

    def policy_stores(self) -> dict[str, PolicyStoreFactory]:
        """Policy-store backend name (`local`, `raft`, ...) -> store factory."""
        return self._plain("policy stores")

    def commands(self) -> dict[str, click.Command]:
        """Command name -> click command for `infermesh <name>`."""
        return self._plain("commands")

    def registrations(self) -> dict[str, dict[str, str]]:
        """Kind title -> {registered name: plugin name}, for `infermesh plugins`."""
        return {
            title: {name: plugin for name, (plugin, _) in found.items()}
            for title, found in self._registered.items()
        }


def _describe(exc: BaseException) -> str:
    """A one-line description of why a plugin failed."""
    if isinstance(exc, _Rejected):
        return str(exc)
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

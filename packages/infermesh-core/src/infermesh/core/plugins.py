"""Plugin discovery and registration: the `infermesh` entry-point group, loaded defensively.

A plugin that fails to import is reported by name with its error and skipped (fatal when
`strict`). Allow/block lists select entry points by name. Typed accessors collect what plugins
register; a name registered twice is an error naming both plugins. Never imports a plugin twice.
"""

from __future__ import annotations

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

__all__ = ["PluginError", "PluginFailure", "PluginHost", "plugin_selection_from_env"]

ENV_ALLOW = "INFERMESH_PLUGINS"
ENV_BLOCK = "INFERMESH_PLUGINS_BLOCK"

T = TypeVar("T")


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


@attrs.frozen
class PluginFailure:
    """A plugin that was skipped, and why (shown by `infermesh plugins`)."""

    name: str
    value: str
    error: str


def _split(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def plugin_selection_from_env(environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(allow, block) from `INFERMESH_PLUGINS` and `INFERMESH_PLUGINS_BLOCK` (comma lists)."""
    env = os.environ if environ is None else environ
    return _split(env.get(ENV_ALLOW)), _split(env.get(ENV_BLOCK))


class PluginHost:
    """The loaded plugins of one process, with typed accessors for what they register."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self.skipped: list[str] = []

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

        `extra` are `(name, module_or_object)` pairs registered directly (tests, embedding).
        """
        host = cls()
        eps = entry_points(group=hookspecs.PROJECT) if entry_point_list is None else entry_point_list
        for ep in sorted(eps, key=lambda e: e.name):
            if (allow and ep.name not in allow) or ep.name in block:
                host.skipped.append(ep.name)
                continue
            if host.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
                host.pm.register(plugin, name=ep.name)
            except Exception as exc:
                failure = PluginFailure(ep.name, ep.value, f"{type(exc).__name__}: {exc}")
                if strict:
                    raise PluginError(
                        f"plugin {ep.name!r} ({ep.value}) failed to load: {failure.error}"
                    ) from exc
                host.failures.append(failure)
        for name, plugin in extra:
            host.pm.register(plugin, name=name)
        try:
            host.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"{exc} (a misspelled hook name? see infermesh.core.hookspecs)") from exc
        return host

    @property
    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    def _collect(
        self,
        hook_name: str,
        kind: str,
        check: Callable[[str, Any], None] | None = None,
    ) -> dict[str, tuple[str, Any]]:
        """Call a register-style hook on every plugin; name -> (plugin name, registered object)."""
        found: dict[str, tuple[str, Any]] = {}
        hook = getattr(self.pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = impl.plugin_name

            def register(*args: Any, _plugin: str = plugin_name) -> None:
                if len(args) == 1:
                    obj = args[0]
                    name = getattr(obj, "name", None)
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"plugin {_plugin!r} registered a {kind} without a name")
                else:
                    name, obj = args
                if check is not None:
                    check(name, obj)
                if name in found:
                    raise PluginError(
                        f"{kind} {name!r} registered by both {found[name][0]!r} and {_plugin!r}"
                    )
                found[name] = (_plugin, obj)

            try:
                impl.function(register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
        return found

    @staticmethod
    def _plain(found: Mapping[str, tuple[str, T]]) -> dict[str, T]:
        return {name: obj for name, (_, obj) in found.items()}

    def runtime_adapters(self) -> dict[str, RuntimeAdapterFactory]:
        return self._plain(self._collect("infermesh_register_runtime_adapters", "runtime adapter"))

    def gpu_adapters(self) -> dict[str, GpuAdapterFactory]:
        return self._plain(self._collect("infermesh_register_gpu_adapters", "GPU adapter"))

    def scorers(self) -> dict[str, Scorer]:
        def check(name: str, obj: Any) -> None:
            if not isinstance(obj, Scorer):
                raise PluginError(f"scorer {name!r} does not implement the Scorer protocol")

        return self._plain(self._collect("infermesh_register_scorers", "scorer", check))

    def transports(self) -> dict[str, TransportFactory]:
        return self._plain(self._collect("infermesh_register_transports", "transport"))

    def commands(self) -> dict[str, click.Command]:
        def check(name: str, obj: Any) -> None:
            if not isinstance(obj, click.Command):
                raise PluginError(f"command {name!r} is not a click.Command")

        return self._plain(self._collect("infermesh_register_commands", "command", check))

    def registrations(self) -> dict[str, dict[str, str]]:
        """kind -> {registered name: plugin name}, for `infermesh plugins`."""
        kinds = {
            "runtime adapters": ("infermesh_register_runtime_adapters", "runtime adapter"),
            "GPU adapters": ("infermesh_register_gpu_adapters", "GPU adapter"),
            "scorers": ("infermesh_register_scorers", "scorer"),
            "transports": ("infermesh_register_transports", "transport"),
            "commands": ("infermesh_register_commands", "command"),
        }
        out: dict[str, dict[str, str]] = {}
        for title, (hook, kind) in kinds.items():
            out[title] = {name: plugin for name, (plugin, _) in self._collect(hook, kind).items()}
        return out

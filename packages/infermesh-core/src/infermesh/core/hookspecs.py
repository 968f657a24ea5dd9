"""The InferMesh plugin contract: every hook a third-party distribution can implement.

This is the first page a plugin author reads. A plugin is a module named in the `infermesh`
entry-point group of its distribution's metadata, for example::

    [project.entry-points.infermesh]
    myplugin = "my_package.infermesh_plugin"

and the module implements any of the hooks below with `@infermesh.core.hookimpl`. Every hook
takes a `register` callback (the llm / tox style): a plugin *declares factories*; the host (agent
or router) calls them, owns the objects' lifecycles and does all scheduling. A hook must be cheap
and must not do I/O: it runs at start-up in every process that loads plugins.

Names are global across plugins: registering a name twice is an error that names both plugins.
A plugin whose module fails to import, whose hook raises, or that registers something that
does not satisfy its protocol is reported by name and skipped (fatal under `--strict-plugins`).
The guide with a complete example is docs/plugins.md.
"""

from __future__ import annotations

from collections.abc import Callable

import click
import pluggy

from infermesh.core.contracts import (
    GpuAdapterFactory,
    RuntimeAdapterFactory,
    Scorer,
    TransportFactory,
)
from infermesh.core.policy import PolicyStoreFactory

__all__ = [
    "PROJECT",
    "RegisterCommand",
    "RegisterGpuAdapter",
    "RegisterPolicyStore",
    "RegisterRuntimeAdapter",
    "RegisterScorer",
    "RegisterTransport",
    "hookimpl",
    "hookspec",
]

PROJECT = "infermesh"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

RegisterRuntimeAdapter = Callable[[str, RuntimeAdapterFactory], None]
RegisterGpuAdapter = Callable[[str, GpuAdapterFactory], None]
RegisterScorer = Callable[[Scorer], None]
RegisterTransport = Callable[[str, TransportFactory], None]
RegisterCommand = Callable[[click.Command], None]
RegisterPolicyStore = Callable[[str, PolicyStoreFactory], None]


@hookspec
def infermesh_register_runtime_adapters(register: RegisterRuntimeAdapter) -> None:
    """Register runtime adapters: `register(kind, factory)`.

    `kind` is what operators write in a `[[runtimes]]` table (`kind = "vllm"`). `factory` receives
    an :class:`~infermesh.core.contracts.AdapterContext` and returns a
    :class:`~infermesh.core.contracts.RuntimeAdapter` (which may also implement
    :class:`~infermesh.core.contracts.RuntimeControl`). The factory must not do I/O; the agent
    starts iterating `adapter.deltas()` when it is ready and calls `aclose()` on shutdown.
    """


@hookspec
def infermesh_register_gpu_adapters(register: RegisterGpuAdapter) -> None:
    """Register GPU telemetry adapters: `register(kind, factory)`.

    `kind` is what operators write in a `[[gpus]]` table (`kind = "dcgm"`). The factory returns a
    :class:`~infermesh.core.contracts.GpuAdapter` streaming
    :class:`~infermesh.core.model.GpuStateDelta` values in normalised units (bytes, watts, 0..1).
    """


@hookspec
def infermesh_register_scorers(register: RegisterScorer) -> None:
    """Register scorers: `register(scorer)`.

    A :class:`~infermesh.core.contracts.Scorer` has a unique `name`, a `default_weight`, and a pure
    `score(request, targets)` returning one score in [0, 1] with a reason per target. The agent
    ranks targets by the weighted sum of all enabled scorers; weights come from config
    (`[scoring.weights]`) and default to `default_weight`. A weight of 0 disables a scorer.
    """


@hookspec
def infermesh_register_transports(register: RegisterTransport) -> None:
    """Register transports: `register(name, factory)`.

    A transport is how the router speaks to a runtime (`openai-http`, `kserve-http`, ...). The
    factory receives a :class:`~infermesh.core.contracts.TransportContext` and returns a
    :class:`~infermesh.core.contracts.Transport`; the router creates one per process and closes it
    on shutdown.
    """


@hookspec
def infermesh_register_policy_stores(register: RegisterPolicyStore) -> None:
    """Register policy-store backends: `register(name, factory)`.

    `name` is what the agent selects (`local` for a one-node store, `raft` for the replicated
    default). `factory` receives a :class:`~infermesh.core.policy.PolicyStoreContext` (node name,
    a data directory the store owns, its options) and returns a
    :class:`~infermesh.core.policy.PolicyStore`. The factory must not do I/O or start threads;
    the agent awaits `store.start()` before the first read and `aclose()` on shutdown.
    """


@hookspec
def infermesh_register_commands(register: RegisterCommand) -> None:
    """Register `infermesh` subcommands: `register(click_command_or_group)`.

    The command's name becomes `infermesh <name>`. Two plugins registering the same name is an
    error that names both. Commands should import heavy dependencies lazily so that
    `infermesh --help` stays fast.
    """

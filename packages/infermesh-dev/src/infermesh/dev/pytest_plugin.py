"""The `infermesh` pytest plugin: fixtures for testing InferMesh plugins (and InferMesh itself).

Installed with infermesh-dev (entry point group `pytest11`), so any test run in an environment
with infermesh-dev has these fixtures; every name starts with `infermesh_`:

- `infermesh_clock`: a `FakeClock` to pass as `clock=` (deterministic Unix time).
- `infermesh_start_vllm(**options)`: an emulated vLLM server (OpenAI API, `/metrics`, `/health`)
  in the test's event loop on 127.0.0.1; options are `EmulatorConfig` fields. `infermesh_vllm`
  is one with the defaults.
- `infermesh_start_agent(*replicas, extra_config=..., env=..., plugin_paths=...)`: real
  emulator processes plus an `infermesh agent run` process, ready (gRPC health SERVING).
- `infermesh_start_router(...)`: the same plus an `infermesh router run` process that lists the
  model.

Async fixtures need an async test: mark it `@pytest.mark.anyio` (anyio's pytest plugin). Every
server and process a fixture started is stopped when the test ends. The module imports nothing
of InferMesh until a fixture is used, so loading it costs a test run nothing.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    from infermesh.dev.fake_clock import FakeClock
    from infermesh.dev.harness import LocalMesh, ReplicaSpec
    from infermesh.dev.vllm_emulator import EmulatorServer

__all__ = [
    "StartMesh",
    "infermesh_clock",
    "infermesh_start_agent",
    "infermesh_start_router",
    "infermesh_start_vllm",
    "infermesh_vllm",
]

MESH_DEFAULTS: dict[str, Any] = {"poll_interval_s": 0.2, "ready_timeout_s": 90.0}
"""Fast telemetry and a start-up deadline that holds on a loaded CI machine."""


class StartMesh(Protocol):
    """`await start(*replicas, extra_config="", env=(), plugin_paths=(), **mesh_options)`."""

    def __call__(
        self,
        *replicas: ReplicaSpec,
        extra_config: str = "",
        env: Sequence[tuple[str, str]] = (),
        plugin_paths: Sequence[Path] = (),
        **mesh_options: Any,
    ) -> Awaitable[LocalMesh]: ...


@pytest.fixture
def infermesh_clock() -> FakeClock:
    """A FakeClock at a fixed Unix time that moves only when the test advances it."""
    from infermesh.dev.fake_clock import FakeClock

    return FakeClock()


@pytest.fixture
async def infermesh_start_vllm() -> AsyncIterator[Callable[..., Awaitable[EmulatorServer]]]:
    """Start emulated vLLM servers in this event loop: `server = await start(model="m")`.

    Keyword arguments are `infermesh.dev.vllm_emulator.EmulatorConfig` fields (`model`,
    `profile` — a GpuProfile or a profile name such as "h100" —, `max_num_seqs`, `loras`,
    `fail_prob`, ...). `server.url` is its base URL on 127.0.0.1.
    """
    from infermesh.dev.profiles import get_profile
    from infermesh.dev.vllm_emulator import EmulatorConfig, start_emulator

    servers: list[EmulatorServer] = []

    async def start(**options: Any) -> EmulatorServer:
        if isinstance(options.get("profile"), str):
            options["profile"] = get_profile(options["profile"])
        server = await start_emulator(EmulatorConfig(**options))
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(servers):
            await server.aclose()


@pytest.fixture
async def infermesh_vllm(
    infermesh_start_vllm: Callable[..., Awaitable[EmulatorServer]],
) -> EmulatorServer:
    """One emulated vLLM server (default model and profile) on 127.0.0.1."""
    return await infermesh_start_vllm()


def _mesh_starter(stack: AsyncExitStack, *, start_router: bool) -> StartMesh:
    async def start(
        *replicas: ReplicaSpec,
        extra_config: str = "",
        env: Sequence[tuple[str, str]] = (),
        plugin_paths: Sequence[Path] = (),
        **mesh_options: Any,
    ) -> LocalMesh:
        from infermesh.dev.harness import LocalMesh, MeshSpec, ReplicaSpec

        environment = dict(env)
        if plugin_paths:
            # Where not-installed plugins (a dist-info plus their modules) live: only the mesh's
            # processes see them, never the test process.
            paths = [str(path) for path in plugin_paths]
            inherited = environment.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
            environment["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [inherited])])
        options = {**MESH_DEFAULTS, **mesh_options}
        spec = MeshSpec(
            replicas=replicas or (ReplicaSpec("h100", "replica-0"),),
            extra_config=extra_config,
            env=tuple(environment.items()),
            start_router=start_router,
            **options,
        )
        return await stack.enter_async_context(LocalMesh(spec))

    return start


@pytest.fixture
async def infermesh_start_agent() -> AsyncIterator[StartMesh]:
    """Start real processes: emulated runtimes (`ReplicaSpec`s, default one vLLM on h100) and an
    agent reading the generated config plus `extra_config` (TOML: more `[[runtimes]]` of a
    plugin's kind, `[scoring.weights]`, ...). `env` is the agent's extra environment;
    `plugin_paths` are directories put on its PYTHONPATH (plugins not installed in the
    environment). Returns the ready `LocalMesh` (`socket_path`, `agent_metrics_url`,
    `config_path`, `replicas`, `workdir` with logs).
    """
    async with AsyncExitStack() as stack:
        yield _mesh_starter(stack, start_router=False)


@pytest.fixture
async def infermesh_start_router() -> AsyncIterator[StartMesh]:
    """As `infermesh_start_agent`, plus a router process that lists the model
    (`mesh.router_url`, an OpenAI API under `/v1`)."""
    async with AsyncExitStack() as stack:
        yield _mesh_starter(stack, start_router=True)

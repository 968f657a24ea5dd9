"""The agent's composition root: build every part from config and plugins, run, shut down.

Construction (`Agent(config, host)`) validates everything and does no I/O, so a bad config
fails before any socket is bound. `run()` binds the servers, pumps adapter deltas into the
store, and on SIGTERM/SIGINT (or `request_stop()`) shuts down within `agent.shutdown_grace_s`.
No scoring or protocol logic lives here.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import anyio.abc

from infermesh.agent.api.scoring import ScoringService
from infermesh.agent.api.server import GrpcServer, SocketInUseError
from infermesh.agent.api.state import StateService
from infermesh.agent.metrics import AgentMetrics, MetricsServer
from infermesh.core.config import Config, GpuConfig, RuntimeConfig
from infermesh.core.contracts import AdapterContext, GpuAdapter, RuntimeAdapter
from infermesh.core.logging import get_logger
from infermesh.core.plugins import PluginError, PluginHost
from infermesh.core.scoring.engine import ScoringEngine, ScoringSetupError
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.state import StateStore

__all__ = ["Agent", "AgentStartupError"]

RESTART_BACKOFF_MIN_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0

_D = TypeVar("_D")
log = get_logger("infermesh.agent")


class AgentStartupError(Exception):
    """The agent cannot start; the message says what to change."""


def _plugin_hint(host: PluginHost) -> str:
    notes = []
    if host.skipped:
        notes.append("skipped by plugins.allow/block: " + ", ".join(host.skipped))
    if host.failures:
        notes.append("failed to load: " + "; ".join(f"{f.name} ({f.error})" for f in host.failures))
    return f" [{'; '.join(notes)}]" if notes else ""


def _make_adapters(
    kind_of: str,
    entries: Sequence[RuntimeConfig | GpuConfig],
    factories: Mapping[str, Callable[[AdapterContext], Any]],
    node: str,
    host: PluginHost,
) -> list[tuple[str, Any]]:
    adapters: list[tuple[str, Any]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{kind_of}[{index}]"
        factory = factories.get(entry.kind)
        if factory is None:
            known = ", ".join(sorted(factories)) or "(none installed)"
            raise AgentStartupError(
                f"{where}: unknown kind {entry.kind!r}; known kinds: {known}{_plugin_hint(host)}"
            )
        name = entry.name or f"{entry.kind}-{index}"
        if name in seen:
            raise AgentStartupError(f"{where}: name {name!r} is used by another {kind_of} entry")
        seen.add(name)
        context = AdapterContext(
            node=node,
            name=name,
            url=entry.url,
            poll_interval_s=entry.poll_interval_s,
            timeout_s=entry.timeout_s,
            options=dict(entry.options),
        )
        try:
            adapter = factory(context)
        except Exception as exc:
            raise AgentStartupError(
                f"{where} (kind {entry.kind!r}, url {entry.url!r}): {type(exc).__name__}: {exc}"
            ) from exc
        adapters.append((name, adapter))
    return adapters


class Agent:
    """Every part of one agent process, wired together."""

    def __init__(
        self, config: Config, host: PluginHost, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = StateStore()
        try:
            self.inflight = InflightTracker(ewma_alpha=config.scoring.outcome_ewma_alpha)
        except ValueError as exc:
            raise AgentStartupError(f"scoring.outcome_ewma_alpha: {exc}") from None
        try:
            registered = host.scorers()
            self.engine = ScoringEngine.from_config(
                self.store, self.inflight, registered, config.scoring
            )
            runtime_factories = host.runtime_adapters()
            gpu_factories = host.gpu_adapters()
        except (ScoringSetupError, PluginError) as exc:
            raise AgentStartupError(f"{exc}{_plugin_hint(host)}") from None
        if not config.agent.shutdown_grace_s >= 0:
            raise AgentStartupError(
                f"agent.shutdown_grace_s must be >= 0, got {config.agent.shutdown_grace_s}"
            )
        self.metrics = AgentMetrics(self.store, self.inflight, self.engine, clock)
        self.runtime_adapters: list[tuple[str, RuntimeAdapter]] = _make_adapters(
            "runtimes", config.runtimes, runtime_factories, config.node.id, host
        )
        self.gpu_adapters: list[tuple[str, GpuAdapter]] = _make_adapters(
            "gpus", config.gpus, gpu_factories, config.node.id, host
        )
        transports = {rt.url.rstrip("/"): rt.transport for rt in config.runtimes}
        transports.update({rt.url: rt.transport for rt in config.runtimes})
        self.scoring_service = ScoringService(
            self.engine, self.inflight, self.metrics, transports=transports, clock=clock
        )
        self.grpc = GrpcServer(
            self.scoring_service,
            StateService(self.store),
            socket_path=config.agent.socket,
            listen=config.agent.listen,
        )
        self.metrics_server: MetricsServer | None = None
        if config.agent.metrics_listen:
            try:
                self.metrics_server = MetricsServer(self.metrics, config.agent.metrics_listen)
            except ValueError as exc:
                raise AgentStartupError(str(exc)) from None
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        """Begin a clean shutdown (what SIGTERM does)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(
        self,
        *,
        handle_signals: bool = True,
        task_status: anyio.abc.TaskStatus[Agent] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until SIGTERM/SIGINT or `request_stop()`; `task_status.started` when ready."""
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        with contextlib.ExitStack() as stack:
            # Installed for the whole run, shutdown included: a second signal (e.g. from both a
            # supervisor and `uv run`) must not kill the agent before it removes its socket.
            signals = (
                stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT))
                if handle_signals
                else None
            )
            await self._start_servers()
            try:
                async with anyio.create_task_group() as tg:
                    if signals is not None:
                        tg.start_soon(self._watch_signals, signals)
                    for name, runtime in self.runtime_adapters:
                        tg.start_soon(
                            self._pump, name, runtime.deltas, self.store.apply_model_delta
                        )
                    for name, gpu in self.gpu_adapters:
                        tg.start_soon(self._pump, name, gpu.deltas, self.store.apply_gpu_delta)
                    await self.grpc.set_serving()
                    self._log_ready()
                    task_status.started(self)
                    await self._stop.wait()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shutdown()

    async def _start_servers(self) -> None:
        try:
            await self.grpc.start()
            if self.metrics_server is not None:
                await self.metrics_server.start()
        except (SocketInUseError, OSError) as exc:
            with anyio.CancelScope(shield=True):
                await self.grpc.stop(0)
            raise AgentStartupError(str(exc)) from None

    def _log_ready(self) -> None:
        log.info(
            "agent ready",
            socket=str(self.grpc.socket_path),
            tcp_port=self.grpc.tcp_port,
            metrics_port=self.metrics_server.port if self.metrics_server else None,
            runtimes=[name for name, _ in self.runtime_adapters],
            gpus=[name for name, _ in self.gpu_adapters],
            scorers={ws.name: ws.weight for ws in self.engine.scorers},
        )

    async def _watch_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self._stop_requested:
                log.info("already shutting down", signal=name)
            else:
                log.info("shutting down", signal=name)
                self.request_stop()

    async def _pump(
        self,
        name: str,
        deltas: Callable[[], AsyncIterator[_D]],
        apply: Callable[[_D], bool],
    ) -> None:
        """Feed one adapter's deltas into the store; restart its stream if it ends or raises
        (the contract says it must not, but a broken plugin must not stop the agent)."""
        backoff_s = RESTART_BACKOFF_MIN_S
        while True:
            stream = deltas()
            try:
                async for delta in stream:
                    apply(delta)
                    backoff_s = RESTART_BACKOFF_MIN_S
                log.warning("adapter stream ended; restarting", adapter=name, retry_in_s=backoff_s)
            except Exception as exc:
                log.error(
                    "adapter failed; restarting",
                    adapter=name,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=backoff_s,
                )
            finally:
                aclose: Any = getattr(stream, "aclose", None)
                if aclose is not None:
                    with anyio.move_on_after(1.0, shield=True):
                        await aclose()
            self.metrics.adapter_restarts.labels(adapter=name).inc()
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_MAX_S)

    async def _shutdown(self) -> None:
        grace_s = self.config.agent.shutdown_grace_s
        started = anyio.current_time()
        # Half the grace for running RPCs (watch streams never end on their own); gRPC bounds
        # its own stop, so the server is always stopped even with a grace of 0.
        await self.grpc.stop(grace_s / 2)
        remaining_s = max(0.0, grace_s - (anyio.current_time() - started))
        with anyio.move_on_after(remaining_s) as scope:
            adapters: list[tuple[str, RuntimeAdapter | GpuAdapter]] = [
                *self.runtime_adapters,
                *self.gpu_adapters,
            ]
            for name, adapter in adapters:
                try:
                    await adapter.aclose()
                except Exception as exc:
                    log.warning("adapter aclose failed", adapter=name, error=repr(exc))
            if self.metrics_server is not None:
                await self.metrics_server.stop()
        if scope.cancelled_caught:
            log.warning("shutdown exceeded agent.shutdown_grace_s", grace_s=grace_s)
        self.grpc.remove_socket()
        log.info("agent stopped")

"""The agent's composition root: build every part from config and plugins, run, shut down.

Construction (`Agent(config, host)`) validates everything and does no I/O, except reading the
Control API's TLS files, so a bad config fails before any socket is bound. `run()` starts the
policy store (`raft` when `[raft]` is set, else `local`), binds the servers (the Control API too
when `control.listen` is set), pumps adapter deltas into the state store, runs the gossip
service when `gossip.enabled`, and on SIGTERM/SIGINT (or `request_stop()`) shuts down within
`agent.shutdown_grace_s`. No scoring or protocol logic lives here.

The Control API answers from the agent's parts (`MeshView`: its node, gossip members, the state
store), records node, model, policy and drain events in an `EventJournal` (fed by the state
store, gossip and the policy watch) and loads models through the runtime adapters that support
`RuntimeControl`, forwarding to another node's agent over mutual TLS with the `[control]` files.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import attrs
import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infermesh.agent.api.control import ControlService
from infermesh.agent.api.control_forward import ControlForwarder
from infermesh.agent.api.control_mesh import MeshView
from infermesh.agent.api.scoring import ScoringService
from infermesh.agent.api.server import GrpcServer, SocketInUseError
from infermesh.agent.api.state import RttSource, StateService
from infermesh.agent.event_feed import EventRecorder
from infermesh.agent.events import EventJournal
from infermesh.agent.gpu_discovery import DiscoveredRuntime, keep_discovering, replica_gpu_finder
from infermesh.agent.metrics import AgentMetrics, MetricsServer
from infermesh.agent.runtime_ops import LocalRuntime, RuntimeOps
from infermesh.agent.tls import (
    ClientIdentityInterceptor,
    TLSFileError,
    channel_credentials,
    server_credentials,
)
from infermesh.core.config import Config, ControlConfig, GpuConfig, RuntimeConfig, parse_host_port
from infermesh.core.contracts import AdapterContext, GpuAdapter, RuntimeAdapter, RuntimeControl
from infermesh.core.logging import get_logger
from infermesh.core.model import ModelStateDelta
from infermesh.core.plugins import PluginError, PluginHost
from infermesh.core.policy import PolicySet, PolicyStore, PolicyStoreContext
from infermesh.core.proto import control_pb2, control_pb2_grpc
from infermesh.core.scoring.engine import ScoringEngine, ScoringSetupError
from infermesh.core.scoring.gpu_map import GpuAssigner, gpu_label
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.state import StateStore

if TYPE_CHECKING:
    from infermesh.agent.gossip.service import GossipService, GossipSettings
    from infermesh.agent.gossip.values import NodeMeta

__all__ = [
    "CONTROL_SERVICE",
    "Agent",
    "AgentStartupError",
    "ControlServer",
    "control_credentials",
    "gossip_settings",
    "make_policy_store",
    "node_meta",
    "policy_backend_name",
]

CONTROL_SERVICE: str = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name

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


def _rtt_source(gossip: GossipService | None) -> RttSource | None:
    """The mesh's Vivaldi RTT estimates by node, for the State service's ListNodeRtts."""
    if gossip is None:
        return None

    def rtts() -> dict[str, float]:
        return {m.node: m.rtt_s for m in gossip.members() if m.rtt_s is not None}

    return rtts


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


def make_policy_store(config: Config, host: PluginHost) -> PolicyStore:
    """This agent's policy store, built (no I/O) from the backend config selects.

    `[raft]` present: the `raft` backend with that table as its options; `[policy]` voters
    instead: `remote`, reading the voters' Control API with `[control]`'s node certificate;
    neither: `local` (`policy_backend_name`). The store owns `<agent data dir>/policy`. The
    agent's own `local` store is used when no plugin registers one (a host loaded without the
    agent plugin, as in tests).
    """
    from infermesh.agent.plugin import local_policy_store

    backend = policy_backend_name(config)
    try:
        factories = host.policy_stores()
    except PluginError as exc:
        raise AgentStartupError(f"{exc}{_plugin_hint(host)}") from None
    factories.setdefault("local", local_policy_store)
    factory = factories.get(backend)
    if factory is None:
        needed_for = {"raft": "the [raft] table", "remote": "[policy] voters"}.get(backend, backend)
        known = ", ".join(sorted(factories))
        raise AgentStartupError(
            f"no policy store {backend!r} is installed (needed for {needed_for}); "
            f"known stores: {known}"
            f"{_plugin_hint(host)}"
        )
    options: dict[str, Any] = {}
    if config.raft is not None:
        options = config.raft.store_options()
    elif config.policy is not None:
        options = config.policy.store_options(config.control)
    context = PolicyStoreContext(
        node=config.node.id,
        data_dir=str(Path(config.agent_data_dir()) / "policy"),
        options=options,
    )
    try:
        return factory(context)
    except Exception as exc:  # PolicyError from a checked option, or a broken plugin
        raise AgentStartupError(f"policy store {backend!r}: {exc}") from exc


def policy_backend_name(config: Config) -> str:
    """The policy store backend `make_policy_store` picks, as ListNodes reports it: `raft` with
    a `[raft]` table, `remote` with `[policy].voters` (and no `[raft]`), else `local`."""
    if config.raft is not None:
        return "raft"
    return "remote" if config.policy is not None and config.policy.voters else "local"


def node_meta(config: Config, gossip_host: str = "", control_port: int | None = None) -> NodeMeta:
    """What this node tells the mesh about itself: roles, zone, labels, APIs and runtimes.

    An API bound to a wildcard address is advertised at `gossip_host` (the host others reach
    this node at); one bound to port 0 is not advertised (its port is not known yet), except the
    Control API once `control_port` (the port it was bound to) is passed.
    """
    from infermesh.agent.gossip.values import NodeMeta

    apis = []
    for name, listen in (
        ("scoring", config.agent.listen),
        ("metrics", config.agent.metrics_listen),
        ("router", config.router.listen),
        ("control", config.control.listen),
    ):
        if not listen:
            continue
        host, port = parse_host_port(listen)
        if name == "control" and control_port:
            port = control_port
        if port == 0:
            continue
        if host in ("0.0.0.0", "::") and gossip_host:
            host = gossip_host
        apis.append((name, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"))
    return NodeMeta(
        node=config.node.id,
        roles=tuple(config.gossip.roles),
        zone=config.gossip.zone or config.node.zone,
        labels=tuple(sorted(config.node.labels.items())),
        apis=tuple(apis),
        runtimes=tuple(runtime.url for runtime in config.runtimes),
    )


def gossip_settings(config: Config) -> GossipSettings:
    """The gossip service's settings from `[gossip]`; AgentStartupError when they conflict."""
    from infermesh.agent.gossip.config import SwimConfig
    from infermesh.agent.gossip.service import GossipSettings

    gossip = config.gossip
    profile = SwimConfig.wan() if gossip.profile.lower() == "wan" else SwimConfig.lan()
    try:
        overrides: dict[str, Any] = gossip.profile_overrides()
        swim = attrs.evolve(profile, **overrides)
    except ValueError as exc:
        message = str(exc).replace("SwimConfig.", "gossip.")
        raise AgentStartupError(f"{message} (profile {gossip.profile!r})") from None
    advertised_host = parse_host_port(gossip.advertise or gossip.bind)[0]
    try:
        return GossipSettings(
            node_id=config.node.id,
            bind=gossip.bind,
            advertise=gossip.advertise,
            seeds=tuple(gossip.seeds),
            key_file=Path(gossip.key_file) if gossip.key_file else None,
            insecure=gossip.insecure,
            swim=swim,
            meta=node_meta(config, advertised_host),
            inject_loss=gossip.inject_loss,
        )
    except ValueError as exc:
        raise AgentStartupError(str(exc)) from None


def control_credentials(control: ControlConfig) -> grpc.ServerCredentials:
    """The Control API's mutual TLS server credentials from `[control]`, read now so a missing
    or unreadable file stops start-up (AgentStartupError naming the key and the file)."""
    missing = [name for name in ("cert", "key", "ca") if not getattr(control, name)]
    if missing:
        keys = ", ".join(f"control.{name}" for name in missing)
        raise AgentStartupError(f"{keys}: required when control.listen is set")
    try:
        return server_credentials(control.cert, control.key, control.ca)
    except TLSFileError as exc:
        raise AgentStartupError(f"[control]: {exc}") from None


class ControlServer:
    """grpc.aio server hosting the Control API over mutual TLS, with health and reflection.

    Kept apart from the Scoring/State server: that one listens on a Unix socket without TLS
    for the local router, this one on TCP for operators, and every call must carry a client
    certificate (ClientIdentityInterceptor) before the servicer decides what it may do.
    """

    def __init__(
        self, service: ControlService, credentials: grpc.ServerCredentials, *, listen: str
    ) -> None:
        self.listen = listen
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._service = service
        self._credentials = credentials
        self._server: Any = None

    async def start(self) -> None:
        """Bind and start serving; AgentStartupError naming `control.listen` if it cannot bind."""
        # SO_REUSEPORT off: a second agent on the same port must fail, not share it.
        server = grpc.aio.server(
            interceptors=[ClientIdentityInterceptor()], options=[("grpc.so_reuseport", 0)]
        )
        control_pb2_grpc.add_ControlServicer_to_server(self._service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        for service in ("", CONTROL_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        try:
            self.port = server.add_secure_port(self.listen, self._credentials)
        except RuntimeError as exc:
            await server.stop(None)
            raise AgentStartupError(
                f"control.listen {self.listen!r}: cannot bind ({exc})"
            ) from None
        await server.start()
        self._server = server

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING and let running calls finish for up to `grace_s`."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        try:
            await self._server.stop(grace_s)
        finally:
            self._server = None


class Agent:
    """Every part of one agent process, wired together."""

    def __init__(
        self, config: Config, host: PluginHost, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.clock = clock
        self.store = StateStore()
        self.policy: PolicyStore = make_policy_store(config, host)
        self.gossip: GossipService | None = None
        if config.gossip.enabled:
            from infermesh.agent.gossip.service import GossipService

            settings = gossip_settings(config)
            try:
                self.gossip = GossipService(settings, self.store, clock=clock)
            except (OSError, ValueError) as exc:  # the key file is read here
                raise AgentStartupError(f"gossip.key_file: {exc}") from None
        try:
            self.inflight = InflightTracker(ewma_alpha=config.scoring.outcome_ewma_alpha)
        except ValueError as exc:
            raise AgentStartupError(f"scoring.outcome_ewma_alpha: {exc}") from None
        try:
            registered = host.scorers()
            self.engine = ScoringEngine.from_config(
                self.store,
                self.inflight,
                registered,
                config.scoring,
                # Vivaldi RTT to each candidate's node, for the net_penalty scorer.
                rtt_estimate=self.gossip.rtt_s if self.gossip is not None else None,
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
        if self.gossip is not None:
            self.metrics.attach_gossip(self.gossip)
        self.runtime_adapters: list[tuple[str, RuntimeAdapter]] = _make_adapters(
            "runtimes", config.runtimes, runtime_factories, config.node.id, host
        )
        self.gpu_adapters: list[tuple[str, GpuAdapter]] = _make_adapters(
            "gpus", config.gpus, gpu_factories, config.node.id, host
        )
        # Which GPUs each runtime's targets run on: configured, reported or discovered.
        self.gpu_assigners = [
            GpuAssigner(gpu_label(rt.gpus), self.store.get_model) for rt in config.runtimes
        ]
        transports = {rt.url.rstrip("/"): rt.transport for rt in config.runtimes}
        transports.update({rt.url: rt.transport for rt in config.runtimes})
        self.scoring_service = ScoringService(
            self.engine, self.inflight, self.metrics, transports=transports, clock=clock
        )
        self.grpc = GrpcServer(
            self.scoring_service,
            StateService(
                self.store,
                rtt_source=_rtt_source(self.gossip),
                policy_source=lambda: self.engine.policy,
            ),
            socket_path=config.agent.socket,
            listen=config.agent.listen,
        )
        self.events = EventJournal(config.node.id, clock=clock)
        self.event_recorder = EventRecorder(self.events)
        if self.gossip is not None:
            self.gossip.subscribe(self.event_recorder.on_member)
        self.control: ControlServer | None = None
        self._self_meta = (
            self.gossip.settings.meta if self.gossip is not None else node_meta(config)
        )
        if config.control.listen:
            credentials = control_credentials(config.control)
            self.control = ControlServer(
                self._control_service(), credentials, listen=config.control.listen
            )
        self.metrics_server: MetricsServer | None = None
        if config.agent.metrics_listen:
            try:
                self.metrics_server = MetricsServer(
                    self.metrics,
                    config.agent.metrics_listen,
                    node_id=config.node.id,
                    gossip=self.gossip,
                )
            except ValueError as exc:
                raise AgentStartupError(str(exc)) from None
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    def _control_service(self) -> ControlService:
        """The Control API over this agent's parts; reads the `[control]` files for forwarding."""
        config = self.config
        urls = [runtime.url for runtime in config.runtimes]
        runtimes = [
            LocalRuntime(name, url, adapter)
            for (name, adapter), url in zip(self.runtime_adapters, urls, strict=True)
            if isinstance(adapter, RuntimeControl)
        ]
        forwarder: ControlForwarder | None = None
        if self.gossip is not None:
            try:
                credentials = channel_credentials(
                    config.control.ca, config.control.cert, config.control.key
                )
            except TLSFileError as exc:
                raise AgentStartupError(f"[control]: {exc}") from None
            forwarder = ControlForwarder(credentials, self.gossip.members)
        mesh = MeshView(
            meta=lambda: self._self_meta,
            state=self.store,
            backend=policy_backend_name(config),
            clock=self.clock,
        )
        if self.gossip is not None:
            mesh = attrs.evolve(mesh, members=self.gossip.members)
        operations = RuntimeOps(config.node.id, runtimes, self.events, forward=forwarder)
        return ControlService(
            self.policy, clock=self.clock, mesh=mesh, journal=self.events, operations=operations
        )

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
            await self._start_policy()
            try:
                await self._start_servers()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._close_policy(self.config.agent.shutdown_grace_s)
                raise
            self._advertise_control_port()
            stack.callback(self.event_recorder.watch_store(self.store).close)
            gossip_error: AgentStartupError | None = None
            try:
                async with anyio.create_task_group() as tg:
                    if signals is not None:
                        tg.start_soon(self._watch_signals, signals)
                    tg.start_soon(self._watch_policy)
                    for (name, runtime), assigner in zip(
                        self.runtime_adapters, self.gpu_assigners, strict=True
                    ):
                        tg.start_soon(
                            self._pump, name, runtime.deltas, self._model_applier(assigner)
                        )
                    for name, gpu in self.gpu_adapters:
                        tg.start_soon(self._pump, name, gpu.deltas, self.store.apply_gpu_delta)
                    self._start_gpu_discovery(tg)
                    gossip_error = await self._start_gossip(tg)
                    if gossip_error is None:
                        await self.grpc.set_serving()
                        self._log_ready()
                        task_status.started(self)
                        await self._stop.wait()
                    # Cancelling also makes the gossip service say goodbye (bounded, shielded).
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shutdown()
            if gossip_error is not None:
                raise gossip_error

    def _advertise_control_port(self) -> None:
        """Advertise the Control API's bound port when `control.listen` asked for port 0 (the
        port is known only now; gossip starts after the servers, so it says it from the start)."""
        if self.control is None or not self.control.port:
            return
        if parse_host_port(self.config.control.listen)[1] != 0:
            return
        advertised_host = ""
        if self.gossip is not None:
            gossip = self.config.gossip
            advertised_host = parse_host_port(gossip.advertise or gossip.bind)[0]
        self._self_meta = node_meta(self.config, advertised_host, self.control.port)
        if self.gossip is not None:
            self.gossip.settings = attrs.evolve(self.gossip.settings, meta=self._self_meta)

    async def _start_gossip(self, tg: anyio.abc.TaskGroup) -> AgentStartupError | None:
        """Bind the gossip sockets and start joining; the error (not raised, so it is not
        wrapped in the task group's ExceptionGroup) when the port cannot be bound."""
        if self.gossip is None:
            return None
        try:
            await tg.start(self.gossip.run)
        except OSError as exc:
            return AgentStartupError(f"gossip.bind {self.config.gossip.bind}: {exc}")
        return None

    async def _start_policy(self) -> None:
        """Load the persisted policy and join the Raft cluster (does not wait for a leader)."""
        try:
            await self.policy.start()
        except Exception as exc:
            with anyio.CancelScope(shield=True):
                await self._close_policy(self.config.agent.shutdown_grace_s)
            raise AgentStartupError(f"policy store: {exc}") from exc
        # In force before the first request is served; `_watch_policy` keeps it current.
        self._apply_policy(await self.policy.get())
        status = await self.policy.status()
        log.info(
            "policy store ready",
            role=status.role,
            leader=status.leader,
            voters=list(status.voters),
            revision=status.revision,
        )

    def _apply_policy(self, policy: PolicySet) -> None:
        """Make `policy` the one the next scoring decision uses (in-flight requests go on), and
        record what changed since the last one as policy, drain and model (pin) events."""
        self.engine.set_policy(policy)
        self.event_recorder.on_policy(policy)
        log.info(
            "policy applied",
            revision=policy.revision,
            drains=sorted(policy.drains),
            pins=sorted(policy.pins),
            scoring=sorted(policy.scoring),
        )

    async def _watch_policy(self) -> None:
        """Apply every new policy revision the store reports; restart the watch if it fails
        (a broken store must not stop the agent; scoring keeps the last applied policy)."""
        backoff_s = RESTART_BACKOFF_MIN_S
        while True:
            try:
                async for policy in self.policy.watch():
                    if policy.revision != self.engine.policy.revision:
                        self._apply_policy(policy)
                    backoff_s = RESTART_BACKOFF_MIN_S
                log.warning("policy watch ended; restarting", retry_in_s=backoff_s)
            except Exception as exc:
                log.error(
                    "policy watch failed; restarting",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=backoff_s,
                )
            await anyio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, RESTART_BACKOFF_MAX_S)

    async def _close_policy(self, timeout_s: float) -> None:
        with anyio.move_on_after(timeout_s) as scope:
            try:
                await self.policy.aclose()
            except Exception as exc:
                log.warning("policy store aclose failed", error=repr(exc))
        if scope.cancelled_caught:
            log.warning("policy store did not close within agent.shutdown_grace_s")

    async def _start_servers(self) -> None:
        try:
            await self.grpc.start()
            if self.metrics_server is not None:
                await self.metrics_server.start()
            if self.control is not None:
                await self.control.start()
        except (SocketInUseError, OSError, AgentStartupError) as exc:
            with anyio.CancelScope(shield=True):
                await self.grpc.stop(0)
            raise AgentStartupError(str(exc)) from None

    def _log_ready(self) -> None:
        log.info(
            "agent ready",
            socket=str(self.grpc.socket_path),
            tcp_port=self.grpc.tcp_port,
            metrics_port=self.metrics_server.port if self.metrics_server else None,
            control_port=self.control.port if self.control else None,
            gossip=self.gossip.address if self.gossip else None,
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

    def _model_applier(self, assigner: GpuAssigner) -> Callable[[ModelStateDelta], bool]:
        """How one runtime's deltas reach the store: with its GPUs (configured, reported by
        the adapter, or discovered) as their `gpu_uuid` label."""
        apply = self.store.apply_model_delta
        return lambda delta: apply(assigner.assign(delta))

    def _start_gpu_discovery(self, tg: anyio.abc.TaskGroup) -> None:
        """Discover the GPUs of the runtimes without `gpus` in the config, where a GPU adapter
        can (the `nvml` kind: the GPUs NVML lists the runtime's processes on)."""
        finder = replica_gpu_finder(self.gpu_adapters)
        runtimes = [
            DiscoveredRuntime(name, runtime.url, assigner)
            for (name, _), runtime, assigner in zip(
                self.runtime_adapters, self.config.runtimes, self.gpu_assigners, strict=True
            )
            if not runtime.gpus
        ]
        if finder is not None and runtimes:
            tg.start_soon(keep_discovering, finder, runtimes)

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
        # its own stop, so the server is always stopped even with a grace of 0. Closing the
        # journal ends every SubscribeEvents follower first, so none holds the stop up.
        self.events.close()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.grpc.stop, grace_s / 2)
            if self.control is not None:
                # Before the policy store closes: no Control call may reach a closed store.
                tg.start_soon(self.control.stop, grace_s / 2)
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
            try:
                await self.policy.aclose()
            except Exception as exc:
                log.warning("policy store aclose failed", error=repr(exc))
        if scope.cancelled_caught:
            log.warning("shutdown exceeded agent.shutdown_grace_s", grace_s=grace_s)
        self.grpc.remove_socket()
        log.info("agent stopped")

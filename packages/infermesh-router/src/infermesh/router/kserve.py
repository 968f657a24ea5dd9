"""The router's KServe v2 ingress: one routing core behind the HTTP routes and the gRPC server.

Built by the app from its scoring, forwarder and outcome reporter, so KServe calls are ranked,
reserved and reported exactly like OpenAI requests; the gRPC server runs only when
`router.grpc_listen` is set. Composition only: the work is in kserve_http and kserve_grpc.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version

import attrs

from infermesh.core.contracts import Transport
from infermesh.core.proto import scoring_pb2
from infermesh.router.asgi import Receive, Scope, Send
from infermesh.router.decision import RouteScoring
from infermesh.router.kserve_grpc import GRPC_LABEL, KServeGrpcIngress
from infermesh.router.kserve_http import KServeHttp
from infermesh.router.kserve_metrics import KServeMetrics
from infermesh.router.kserve_routing import Admit, KServeRouting
from infermesh.router.local_scoring import LocalScoring
from infermesh.router.metrics import RouterMetrics

__all__ = ["KServeIngress", "KServeSettings", "is_kserve_path"]


def is_kserve_path(path: str) -> bool:
    """True for the paths the KServe v2 HTTP handler answers (`/v2` and below)."""
    return path == "/v2" or path.startswith("/v2/")


def grpc_label_lookup(scoring: RouteScoring) -> Callable[[str], str]:
    """target id -> its `kserve_grpc` label, read from local scoring's replica of the agent's
    state (agent mode ranks on the agent and gets no labels: "")."""
    if not isinstance(scoring, LocalScoring):
        return lambda target_id: ""
    replica = scoring.replica

    def label_of(target_id: str) -> str:
        live = replica.live
        state = live.get_target(target_id) if live is not None else None
        return (state.labels.get(GRPC_LABEL) or "") if state is not None else ""

    return label_of


def _router_version() -> str:
    try:
        return version("infermesh-router")
    except PackageNotFoundError:
        return "0"


@attrs.frozen
class KServeSettings:
    """What the KServe ingress needs from `config.router` and `[[runtimes]]`."""

    grpc_listen: str = ""
    """`host:port` of the gRPC server; empty: none."""
    grpc_targets: Mapping[str, str] = attrs.field(factory=dict)
    """Runtime base URL -> the same Triton's gRPC `host:port` (see `grpc_targets_of`)."""
    max_attempts: int = 2
    retry_after_s: float = 1.0
    max_body_bytes: int = 8 * 1024 * 1024
    shutdown_grace_s: float = 5.0


class KServeIngress:
    """`http` is the ASGI handler of `/v2` paths; `start`/`aclose` run the gRPC server."""

    def __init__(
        self,
        scoring: RouteScoring,
        transport: Callable[[str], Transport],
        report: Callable[[scoring_pb2.Outcome], None],
        metrics: RouterMetrics,
        settings: KServeSettings,
        admit: Admit | None = None,
    ) -> None:
        """`admit` is the admission gate's: inference calls pass it as OpenAI requests do."""
        self.settings = settings
        self.metrics = KServeMetrics(metrics)
        self.routing = KServeRouting(
            scoring,
            report,
            max_attempts=settings.max_attempts,
            retry_after_s=settings.retry_after_s,
            admit=admit,
        )
        server_version = _router_version()
        self.http = KServeHttp(
            self.routing,
            transport,
            self.metrics,
            max_body_bytes=settings.max_body_bytes,
            server_version=server_version,
        )
        self.grpc: KServeGrpcIngress | None = None
        if settings.grpc_listen:
            self.grpc = KServeGrpcIngress(
                settings.grpc_listen,
                self.routing,
                settings.grpc_targets,
                self.metrics,
                server_version=server_version,
                label_of=grpc_label_lookup(scoring),
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.http(scope, receive, send)

    async def start(self) -> None:
        if self.grpc is not None:
            await self.grpc.start()

    async def aclose(self) -> None:
        if self.grpc is not None:
            await self.grpc.aclose(self.settings.shutdown_grace_s)

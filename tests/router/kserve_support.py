"""KServe ingress test fixtures: emulated Triton servers and a scoring that ranks them in order.

`StaticScoring` implements the router's `RouteScoring` in memory: `routes[model]` is the ranked
list of choices, every outcome is recorded. The Triton servers are the real emulator.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import attrs

from infermesh.core.contracts import TransportContext
from infermesh.core.model import RequestFeatures, TargetKey
from infermesh.core.proto import scoring_pb2
from infermesh.dev.triton_emulator import TritonEmulator, start_triton_emulator
from infermesh.dev.triton_server import TritonEmulatorConfig
from infermesh.router.decision import Admission, Choice, Decision
from infermesh.router.forward import Forwarder, ForwardSettings
from infermesh.router.kserve import KServeIngress, KServeSettings
from infermesh.router.kserve_routing import KSERVE_TRANSPORT
from infermesh.router.metrics import RouterMetrics
from infermesh.router.plugin import kserve_http_transport, openai_http_transport

MAX_BODY_BYTES = 64 * 1024


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def choice(endpoint: str, model: str, transport: str = KSERVE_TRANSPORT) -> Choice:
    key = TargetKey(model=model, node="node", endpoint=endpoint)
    return Choice(key.target_id, endpoint, transport)


@attrs.define
class StaticScoring:
    """Ranks `routes[model]` in order (`[]`: known but nothing healthy); records outcomes."""

    routes: dict[str, list[Choice]] = attrs.field(factory=dict)
    serving: bool = True
    outcomes: list[scoring_pb2.Outcome] = attrs.field(factory=list)
    features: list[RequestFeatures] = attrs.field(factory=list)
    agent: Any = None
    mode: str = "local"
    outcome_linger_s: float = 0.0

    def attach_metrics(self, metrics: RouterMetrics) -> None:
        pass

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def score(self, features: RequestFeatures, max_targets: int) -> Decision:
        self.features.append(features)
        ranked = self.routes.get(features.model)
        if ranked is None:
            return Decision(False, ())
        if not ranked:
            return Decision(True, (), "", 1, ("node|x|m: telemetry stale",), 2.5)
        return Decision(True, tuple(ranked[:max_targets]), f"res-{len(self.features)}", 1)

    async def admit(self, features: RequestFeatures, choice: Choice) -> Admission:
        return Admission(f"adm-{choice.target_id}")

    def finished(self, outcome: scoring_pb2.Outcome) -> None:
        self.outcomes.append(outcome)

    async def model_names(self) -> list[str]:
        return sorted(name for name, ranked in self.routes.items() if ranked)

    async def health(self) -> tuple[bool, str]:
        return self.serving, "" if self.serving else "the agent at unix:///x is unreachable"


@attrs.define
class KServeRig:
    """Two emulated Tritons (a, b) and the KServe ingress in front of them."""

    scoring: StaticScoring
    a: TritonEmulator
    b: TritonEmulator
    ingress: KServeIngress
    forwarder: Forwarder

    def route(self, model: str, *tritons: TritonEmulator | str) -> None:
        """Rank these Tritons (or endpoint URLs) for `model`."""
        self.scoring.routes[model] = [
            choice(t if isinstance(t, str) else t.http_url, model) for t in tritons
        ]


@contextlib.asynccontextmanager
async def kserve_rig(
    grpc_listen: str = "", config: TritonEmulatorConfig | None = None
) -> AsyncIterator[KServeRig]:
    """The ingress (gRPC too when `grpc_listen` is set) with `simple` routed to a, then b."""
    a = await start_triton_emulator(config)
    b = await start_triton_emulator(config)
    scoring = StaticScoring()
    forwarder = Forwarder(
        scoring,
        {"kserve-http": kserve_http_transport, "openai-http": openai_http_transport},
        TransportContext(connect_timeout_s=2.0, read_timeout_s=30.0),
        ForwardSettings(),
        RouterMetrics(),
        lambda outcome: None,
    )
    ingress = KServeIngress(
        scoring,
        forwarder.transport,
        lambda outcome: None,
        RouterMetrics(),
        KServeSettings(
            grpc_listen=grpc_listen,
            grpc_targets={a.http_url: a.grpc_target, b.http_url: b.grpc_target},
            max_body_bytes=MAX_BODY_BYTES,
        ),
    )
    rig = KServeRig(scoring, a, b, ingress, forwarder)
    rig.route("simple", a, b)
    try:
        await ingress.start()
        yield rig
    finally:
        await ingress.aclose()
        await forwarder.aclose()
        await a.aclose()
        await b.aclose()

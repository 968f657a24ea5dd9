"""InferMesh configuration: one TOML file, then `INFERMESH_*` environment, then CLI flags.

Later sources override earlier ones key by key. Each source is validated as it is merged, so an
error names the source that introduced it (file path, environment variable or flag), the dotted
key and what was expected. This module never reads files or the environment unless
`load_config` is called. Every key is documented in docs/config.md.
"""

from __future__ import annotations

import difflib
import math
import os
import socket
import tempfile
import tomllib
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.cols import is_mapping, is_sequence, list_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn

from infermesh.core.logging import LOG_FORMATS, LOG_LEVELS

__all__ = [
    "ENV_CONFIG_PATH",
    "ENV_PREFIX",
    "AdmissionConfig",
    "AgentConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "ControlConfig",
    "GossipConfig",
    "GpuConfig",
    "HedgingConfig",
    "LoggingConfig",
    "NodeConfig",
    "PluginsConfig",
    "PolicyConfig",
    "RaftConfig",
    "RetryConfig",
    "RouterConfig",
    "RuntimeConfig",
    "ScoringConfig",
    "SloAdmissionConfig",
    "default_agent_data_dir",
    "default_agent_socket",
    "env_overrides",
    "load_config",
    "parse_host_port",
    "read_toml",
    "runtime_base_url",
    "structure_config",
]

ENV_PREFIX = "INFERMESH_"
ENV_CONFIG_PATH = "INFERMESH_CONFIG"
# Variables that are not config keys (read elsewhere).
_ENV_NOT_KEYS = frozenset({"INFERMESH_CONFIG", "INFERMESH_PLUGINS", "INFERMESH_PLUGINS_BLOCK"})


class ConfigError(Exception):
    """Invalid configuration; the message says where, which key, and what was expected."""


def default_agent_socket() -> str:
    """Where the agent's Scoring API listens unless configured: a per-user runtime directory."""
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return str(Path(runtime_dir) / f"infermesh-{os.getuid()}" / "agent.sock")


def default_agent_data_dir(node_id: str) -> str:
    """Where the agent keeps its state (the policy store) unless configured: a per-user state
    directory, one per node id so agents of several nodes on one host never share it."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state_home) / "infermesh" / node_id)


def runtime_base_url(url: str, where: str, *, api_suffix: str = "/v1") -> str:
    """A runtime's base URL as targets and the router use it: no surrounding space, no trailing
    `/` and no API prefix (`/v1` for OpenAI servers, `/v2` for KServe).

    Raises ConfigError naming `where` unless it is an http:// or https:// URL with a host.
    """
    base = url.strip().rstrip("/").removesuffix(api_suffix)
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: url {url!r} must be an http:// or https:// base URL")
    return base


def parse_host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[v6addr]:port` -> (host, port); port 0 means "any free port".

    Raises ValueError with a message that shows the expected form.
    """
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8080), got {text!r}")
    return host, int(port_text)


@attrs.define
class NodeConfig:
    """`[node]`: who this node is in the mesh."""

    id: str = attrs.field(factory=socket.gethostname)
    """This node's id in target ids, logs and metrics (default: the host name)."""
    zone: str = ""
    """Free-form failure zone (rack, availability zone) used for placement."""
    labels: dict[str, str] = attrs.field(factory=dict)
    """Free-form `key = "value"` labels, advertised to the mesh in the member metadata."""


@attrs.define
class RuntimeConfig:
    """One `[[runtimes]]` table: an inference server the agent watches."""

    kind: str
    """Adapter kind registered by a plugin (`vllm`, `triton`, ...)."""
    url: str
    """Base URL of the runtime's HTTP server, e.g. `http://127.0.0.1:8000`."""
    name: str = ""
    """Optional name of this runtime in logs and metrics."""
    poll_interval_s: float = 1.0
    """How often the adapter polls the runtime."""
    timeout_s: float = 2.0
    """Timeout of one poll."""
    transport: str = attrs.field(
        default=attrs.Factory(
            lambda self: "kserve-http" if self.kind == "triton" else "openai-http", takes_self=True
        )
    )
    """Transport the router uses for this runtime's targets: `kserve-http` for Triton,
    `openai-http` for every other kind, unless set."""
    options: dict[str, Any] = attrs.field(factory=dict)
    """Adapter-specific keys, passed unparsed to the adapter."""
    gpus: list[str] = attrs.field(factory=list)
    """UUIDs of the GPUs (or MIG instances) this runtime runs on, e.g. `["GPU-3f2a..."]`: its
    targets are as healthy as the worst of them. Empty: what the adapter reports (Triton's
    `gpu_uuid` labels), else what the `nvml` GPU source discovers from the runtime's processes,
    else every GPU of the node counts for scoring but none excludes."""


@attrs.define
class GpuConfig:
    """One `[[gpus]]` table: a GPU telemetry source the agent watches."""

    kind: str
    """GPU adapter kind registered by a plugin: `dcgm` (dcgm-exporter), `nvml` (the local GPUs
    through NVML) or `triton` (Triton's own `nv_gpu_*` gauges)."""
    url: str = ""
    """Source URL: for `dcgm`, dcgm-exporter's `/metrics` URL (empty:
    `http://127.0.0.1:9400/metrics`); `nvml` takes none."""
    name: str = ""
    """Optional name of this source in logs and metrics."""
    poll_interval_s: float = 1.0
    """How often the adapter polls the source."""
    timeout_s: float = 2.0
    """Timeout of one poll."""
    options: dict[str, Any] = attrs.field(factory=dict)
    """Adapter-specific keys, passed unparsed to the adapter."""


@attrs.define
class ScoringConfig:
    """`[scoring]`: how targets are ranked, in the agent and in routers scoring locally."""

    weights: dict[str, float] = attrs.field(factory=dict)
    """Scorer name -> weight; unnamed scorers use their default weight; 0 disables one."""
    stale_after_s: float = 5.0
    """A target whose telemetry is older than this is filtered out."""
    prefix_load_factor: float = 1.25
    """Bounded-load factor c: a prefix stays on its replica while that replica's load is below
    c times the mean load of the candidates."""
    prefix_min_capacity: int = 4
    """A prefix also stays on its replica while that replica's load is below this, however idle
    the others are: runtimes batch many sequences, and spilling the second concurrent request
    would waste the prefix cache. 0 or 1 leaves only the bounded-load rule."""
    outcome_ewma_alpha: float = 0.2
    """Smoothing of the TTFT and error-rate averages fed by outcome reports, in (0, 1]."""
    max_candidates: int = 64
    """A model with more targets than this has at most this many scored per decision: its
    prefix owners, its least loaded and a random sample of the rest (docs/agent.md); 0 scores
    every target."""


@attrs.define
class AgentConfig:
    """`[agent]`: the node agent's APIs, metrics endpoint and state directory."""

    socket: str = attrs.field(factory=default_agent_socket)
    """Unix domain socket of the Scoring and State APIs (default:
    `$XDG_RUNTIME_DIR/infermesh-<uid>/agent.sock`, else under the temp directory)."""
    listen: str = ""
    """Optional TCP `host:port` for the same APIs (empty: UDS only)."""
    metrics_listen: str = "127.0.0.1:9464"
    """`host:port` of the Prometheus /metrics endpoint (empty: disabled)."""
    shutdown_grace_s: float = 5.0
    """How long shutdown waits for in-flight calls and for the policy store to close."""
    data_dir: str = ""
    """The agent's state directory (the policy store lives in `<data_dir>/policy`); empty:
    `default_agent_data_dir(node.id)`, see `Config.agent_data_dir()`."""


@attrs.define
class RaftConfig:
    """`[raft]`: this agent is a voter of the replicated policy store (docs/policy.md).

    Mirrors `RaftOptions` in infermesh.agent.policy.raft, which checks the same rules again
    when the store is built; `store_options()` is what the store receives.
    """

    listen: str = ""
    """This voter's Raft `host:port`, as the other voters dial it (required)."""
    voters: list[str] = attrs.field(factory=list)
    """Every voter's Raft `host:port`, this one included (empty: just `listen`)."""
    password: str = attrs.field(default="", repr=False)  # never in a logged repr
    """Shared secret encrypting Raft traffic; required with more than one voter."""
    password_file: str = ""
    """File holding the password (read by `load_config`; surrounding whitespace is ignored)."""
    election_timeout_s: list[float] = attrs.field(factory=lambda: [1.0, 3.0])
    """Randomised election timeout range `[min, max]`."""
    heartbeat_s: float = 0.1
    """Append-entries period; below `election_timeout_s[0]`."""
    commit_timeout_s: float = 5.0
    """How long a write waits for a commit before it fails with "no leader"."""
    snapshot_after_entries: int = 1000
    """Write a snapshot and truncate the journal past this many entries."""
    snapshot_after_s: float = 300.0
    """... or when this long has passed since the last snapshot."""

    def store_options(self) -> dict[str, Any]:
        """The table as the `raft` policy store reads it (`PolicyStoreContext.options`)."""
        options: dict[str, Any] = {
            "listen": self.listen,
            "voters": list(self.voters) or [self.listen],
            "election_timeout_s": list(self.election_timeout_s),
            "heartbeat_s": self.heartbeat_s,
            "commit_timeout_s": self.commit_timeout_s,
            "snapshot_after_entries": self.snapshot_after_entries,
            "snapshot_after_s": self.snapshot_after_s,
        }
        if self.password:
            options["password"] = self.password
        return options


@attrs.define
class PolicyConfig:
    """`[policy]`: this agent is not a voter; it reads and watches the policy through the
    Control API of voter agents (docs/policy.md), presenting `[control]`'s node certificate."""

    voters: list[str] = attrs.field(factory=list)
    """Control API `host:port` of voter agents (required; tried in turn)."""
    watch_retry_s: float = 5.0
    """Longest wait before trying the next voter after a voter failed (the wait doubles
    from 0.1 s up to this)."""
    resync_s: float = 30.0
    """Re-read the whole policy this often even when no change event arrived."""
    timeout_s: float = 10.0
    """Deadline of one call to a voter (a write waits for the Raft commit)."""

    def store_options(self, control: ControlConfig) -> dict[str, Any]:
        """The table as the `remote` policy store reads it, with `[control]`'s TLS files."""
        return {
            "voters": list(self.voters),
            "cert": control.cert,
            "key": control.key,
            "ca": control.ca,
            "watch_retry_s": self.watch_retry_s,
            "resync_s": self.resync_s,
            "timeout_s": self.timeout_s,
        }


@attrs.define
class ControlConfig:
    """`[control]`: the agent serves the Control API (docs/control-api.md) over mutual TLS."""

    listen: str = ""
    """TCP `host:port` of the Control API; port 0 picks a free one (empty: not served)."""
    cert: str = ""
    """PEM certificate this node presents (`infermesh certs issue NAME --role node`)."""
    key: str = ""
    """PEM private key of `cert`."""
    ca: str = ""
    """PEM CA certificate every client certificate must be signed by."""


@attrs.define
class RouterHttpConfig:
    """`[router.http]`: ingress protocol and hygiene settings (docs/router.md "Protocols")."""

    tls_cert: str = ""
    """PEM certificate chain served on `router.listen` (with `tls_key`); empty: cleartext."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    max_header_bytes: int = 16384
    """Largest request head (request line and headers) accepted; larger gets 431."""
    header_timeout_s: float = 10.0
    """Time a client has to send a complete request head before the connection is closed."""
    body_timeout_s: float = 30.0
    """Time a client has to send the whole request body once its head is in; then 408."""
    idle_timeout_s: float = 30.0
    """Idle keep-alive connections are closed after this long."""
    max_connections: int = 4096
    """Concurrent connections (and requests) before new ones get 503 (uvicorn)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: stop accepting, let in-flight requests and streams finish up to this long."""
    api_keys_file: str = ""
    """File of accepted API keys (Bearer tokens), one per line, `#` comments; empty: no auth."""
    auth_exempt_paths: list[str] = attrs.field(factory=lambda: ["/health", "/metrics"])
    """Paths served without an API key."""
    cors_origins: list[str] = attrs.field(factory=list)
    """Origins allowed by CORS (`*` for any); empty: no CORS headers."""
    otel: bool = False
    """Emit OpenTelemetry spans (needs the `infermesh-router[otel]` extra and an SDK)."""


@attrs.define
class HedgingConfig:
    """`[router.hedging]`: a second attempt on the next-ranked target when the first has produced
    no first byte/token after a delay learnt from observed TTFTs (docs/router.md#hedging)."""

    enabled: bool = True
    """False: never hedge (a policy `hedging` entry can turn it on or off per model and class)."""
    quantile: float = 0.95
    """The hedge fires at this quantile of the observed TTFT (per model and prompt-length
    bucket)."""
    min_delay_s: float = 0.02
    """Floor of the hedge delay."""
    max_delay_s: float = 5.0
    """Ceiling of the hedge delay."""
    default_delay_s: float = 0.5
    """The delay until `min_samples` TTFTs of a model and bucket were seen."""
    min_samples: int = 20
    """TTFTs of a model and bucket needed before the learnt quantile is used."""
    window: int = 512
    """TTFTs kept per model and prompt-length bucket (the newest)."""
    prompt_buckets: list[int] = attrs.field(factory=lambda: [256, 1024, 4096, 16384])
    """Upper bounds (prompt tokens) of the prompt-length buckets; longer prompts share the last."""
    max_hedges: int = 1
    """Hedges per request (a policy's `max_hedges` overrides)."""
    budget_ratio: float = 0.1
    """Hedge tokens each request earns: hedges stay within this share of requests."""
    budget_burst: float = 5.0
    """Most hedge tokens saved up (the bucket starts full)."""
    non_idempotent_models: list[str] = attrs.field(factory=list)
    """Models never hedged (besides requests sent with `x-infermesh-idempotent: false`)."""


@attrs.define
class RetryConfig:
    """`[router.retries]`: the retry budget (gRFC A6 retryThrottling): each failed attempt costs
    a token, each success returns `token_ratio`; retries only while tokens > max_tokens / 2."""

    max_tokens: float = 10.0
    """Size of the retry token bucket (it starts full)."""
    token_ratio: float = 0.1
    """Tokens a successful attempt returns."""


@attrs.define
class BreakerConfig:
    """`[router.breaker]`: per-target circuit breaking / outlier ejection (docs/router.md)."""

    enabled: bool = True
    """False: never eject a target."""
    consecutive_failures: int = 5
    """Failures in a row that eject a target."""
    failure_rate: float = 0.5
    """Share of failed attempts among the last `window` that ejects a target."""
    window: int = 20
    """Attempts the failure rate is computed over."""
    min_requests: int = 10
    """Attempts in the window before `failure_rate` applies."""
    ejection_s: float = 5.0
    """First ejection; each further one in a row doubles it, up to `max_ejection_s`."""
    max_ejection_s: float = 60.0
    """Longest ejection."""


@attrs.define
class SloAdmissionConfig:
    """`[router.admission.standard]`: one SLO class's admission limits, per model, on one router.

    Policy (`admission` entries of the operator policy) overrides these per model and class.
    """

    max_concurrent: int = 1024
    """Requests of this class in flight per model before new ones wait in the queue."""
    max_queue: int = 1024
    """Requests of this class waiting per model before new ones get 429 `overloaded`."""
    max_queue_wait_s: float = 5.0
    """Longest wait in the queue; past it the request gets 429 `overloaded`."""
    shed_at_load: float = 0.95
    """Fleet saturation (0..1] above which new requests of this class get 429 `overloaded`."""


@attrs.define
class LatencyAdmissionConfig(SloAdmissionConfig):
    """`[router.admission.latency]`: short queue wait, never shed by saturation (1.0)."""

    max_queue: int = 128
    max_queue_wait_s: float = 1.0
    shed_at_load: float = 1.0


@attrs.define
class BatchAdmissionConfig(SloAdmissionConfig):
    """`[router.admission.batch]`: a quarter of the slots, long queue, shed first (0.8)."""

    max_concurrent: int = 256
    max_queue: int = 4096
    max_queue_wait_s: float = 30.0
    shed_at_load: float = 0.8


@attrs.define
class AdmissionConfig:
    """`[router.admission]`: per model and SLO class concurrency, queues and saturation shedding
    (docs/admission.md)."""

    enabled: bool = True
    """False admits every request at once (tenant quotas from policy still apply)."""
    max_concurrent_per_model: int = 1024
    """Requests of all classes in flight per model; a freed slot goes to `latency` first."""
    saturation_waiting: float = 8.0
    """Requests queued in a runtime at which that replica counts as fully saturated."""
    saturation_kv_cache_usage: float = 0.95
    """KV-cache usage at which a replica counts as fully saturated."""
    latency: LatencyAdmissionConfig = attrs.field(factory=LatencyAdmissionConfig)
    standard: SloAdmissionConfig = attrs.field(factory=SloAdmissionConfig)
    batch: BatchAdmissionConfig = attrs.field(factory=BatchAdmissionConfig)


@attrs.define
class RouterConfig:
    """`[router]`: the OpenAI-compatible ingress (docs/router.md)."""

    listen: str = "127.0.0.1:8080"
    """HTTP `host:port` of the OpenAI-compatible API."""
    agent: str = ""
    """gRPC target of the local agent: `unix:///path` or `host:port`; empty uses agent.socket."""
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest request body accepted; a larger one gets 413."""
    connect_timeout_s: float = 2.0
    """Timeout to connect to a runtime."""
    read_timeout_s: float = 600.0
    """Timeout between bytes read from a runtime."""
    max_attempts: int = 2
    """Attempts per request on distinct targets, only before the first byte is relayed."""
    server: str = "uvicorn"
    """Ingress HTTP server: `uvicorn` (HTTP/1.1, uvloop + httptools) or `hypercorn` (HTTP/1.1 and
    HTTP/2 on the same port: h2c prior knowledge and upgrade, h2 over TLS by ALPN)."""
    models_cache_s: float = 1.0
    """How long the answer of `GET /v1/models` is cached."""
    retry_after_s: float = 1.0
    """`Retry-After` sent with 503 when no target is healthy."""
    scoring: str = "local"
    """Where requests are ranked: `local` (in the router, on a replica of the agent's state kept
    by its State watch streams) or `agent` (one ScoreTargets call to the agent per request)."""
    hedging: HedgingConfig = attrs.field(factory=HedgingConfig)
    retries: RetryConfig = attrs.field(factory=RetryConfig)
    breaker: BreakerConfig = attrs.field(factory=BreakerConfig)
    http: RouterHttpConfig = attrs.field(factory=RouterHttpConfig)
    grpc_listen: str = ""
    """`host:port` of the KServe v2 gRPC ingress (GRPCInferenceService, forwarded to Triton
    targets); empty: no gRPC ingress."""
    admission: AdmissionConfig = attrs.field(factory=AdmissionConfig)
    """`[router.admission]`: concurrency, queues and shedding by SLO class (docs/admission.md)."""


@attrs.define
class GossipConfig:
    """`[gossip]`: the SWIM membership mesh between agents (docs/gossip.md)."""

    enabled: bool = False
    """True turns the mesh on."""
    bind: str = "0.0.0.0:7946"
    """UDP and TCP `host:port` (the same port for both); port 0 picks a free one."""
    advertise: str = ""
    """`host:port` other nodes use to reach this one; empty: `bind` (not a wildcard then)."""
    seeds: list[str] = attrs.field(factory=list)
    """`host:port` or `dns-name:port` of members to join through."""
    key_file: str = ""
    """Base64 AES keys, one per line, the first being the primary."""
    insecure: bool = False
    """Plaintext gossip without a key file (a loud warning at start)."""
    profile: str = "lan"
    """SWIM parameters: `lan` or `wan` (memberlist's profiles)."""
    roles: list[str] = attrs.field(factory=list)
    """Roles advertised in the member metadata."""
    zone: str = ""
    """Zone advertised in the member metadata (default: `node.zone`)."""
    inject_loss: float = 0.0
    """Test-only fault injection: drop this fraction of inbound packets."""
    # Advanced: override one parameter of the profile (0 keeps the profile's value).
    probe_interval_s: float = 0.0
    """Time between failure-detection probes (0: the profile's, lan 1.0, wan 5.0)."""
    probe_timeout_s: float = 0.0
    """How long a direct probe waits for its ack, at most `probe_interval_s` (0: the
    profile's, lan 0.5, wan 3.0)."""
    suspicion_mult: float = 0.0
    """Suspicion timeout multiplier: a suspect is declared dead after at least
    `suspicion_mult * max(1, log10 N) * probe_interval_s` (0: the profile's, lan 4, wan 6)."""
    gossip_interval_s: float = 0.0
    """Time between gossip rounds (0: the profile's, lan 0.2, wan 0.5)."""
    push_pull_interval_s: float = 0.0
    """Time between full-state exchanges over TCP (0: the profile's, lan 30, wan 60)."""

    def profile_overrides(self) -> dict[str, float]:
        """The SWIM parameters this table overrides: name -> value (only those set)."""
        names = (
            "probe_interval_s",
            "probe_timeout_s",
            "suspicion_mult",
            "gossip_interval_s",
            "push_pull_interval_s",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) > 0}


@attrs.define
class PluginsConfig:
    """`[plugins]`: which plugins load (docs/plugins.md); `INFERMESH_PLUGINS` replaces `allow`."""

    allow: list[str] = attrs.field(factory=list)
    """Only these entry-point names are loaded (empty: all)."""
    block: list[str] = attrs.field(factory=list)
    """These entry-point names are never loaded."""
    strict: bool = False
    """A plugin that fails to load is fatal instead of reported and skipped."""


@attrs.define
class LoggingConfig:
    """`[logging]`: log level and format of every InferMesh process."""

    level: str = "info"
    """`debug`, `info`, `warning`, `error` or `critical`."""
    format: str = "auto"
    """`auto` (pretty on a TTY, JSON otherwise), `json` or `console`."""


@attrs.define
class Config:
    node: NodeConfig = attrs.field(factory=NodeConfig)
    agent: AgentConfig = attrs.field(factory=AgentConfig)
    router: RouterConfig = attrs.field(factory=RouterConfig)
    runtimes: list[RuntimeConfig] = attrs.field(factory=list)
    gpus: list[GpuConfig] = attrs.field(factory=list)
    scoring: ScoringConfig = attrs.field(factory=ScoringConfig)
    gossip: GossipConfig = attrs.field(factory=GossipConfig)
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    raft: RaftConfig | None = None
    """`[raft]`; absent: the agent keeps its policy in a one-node local store."""
    control: ControlConfig = attrs.field(factory=ControlConfig)
    """`[control]`; `control.listen` empty: the agent does not serve the Control API."""
    policy: PolicyConfig | None = None
    """`[policy]`; present: the agent reads the policy from voter agents (not with `[raft]`)."""

    def agent_data_dir(self) -> str:
        """`agent.data_dir`, or the per-user default for this node id."""
        return self.agent.data_dir or default_agent_data_dir(self.node.id)

    def agent_target(self) -> str:
        """The gRPC target a router or CLI uses to reach the local agent."""
        if self.router.agent:
            return self.router.agent
        return f"unix://{self.agent.socket}"


# --------------------------------------------------------------------------- structuring


class _WrongValue(ValueError):
    """A leaf value of the wrong type; the message says what was expected and what was found."""


def describe_type(tp: Any) -> str:
    """How a config type reads in an error message: `an integer`, `a list of strings`, ..."""
    simple = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean (true or false)",
        Any: "any value",
    }
    if tp in simple:
        return simple[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        item = args[0]
        if attrs.has(item):
            return "an array of tables"
        return f"a list of {_plural(describe_type(item))}"
    if origin is dict and len(args) == 2:
        if args[1] is Any:
            return "a table"
        return f"a table of {_plural(describe_type(args[1]))}"
    if attrs.has(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _plural(described: str) -> str:
    word = described.split(" ", 1)[1] if " " in described else described
    head, _, rest = word.partition(" ")
    return f"{head}s {rest}".rstrip()


def _show(value: Any) -> str:
    """A value as an error message shows it: its TOML type and repr."""
    if isinstance(value, bool):
        kind = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, float):
        kind = "number"
    elif isinstance(value, str):
        kind = "string"
    elif isinstance(value, Mapping):
        kind = "table"
    elif isinstance(value, list | tuple):
        kind = "array"
    else:
        kind = type(value).__name__
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _wrong(tp: Any, value: Any) -> _WrongValue:
    return _WrongValue(f"expected {describe_type(tp)}, got {_show(value)}")


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _wrong(float, value)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise _wrong(int, value)

    def structure_bool(value: Any, _: type) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise _wrong(bool, value)

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise _wrong(str, value)
        return value

    def guard(
        tp: Any, accepts: Callable[[Any], bool], inner: Callable[[Any, Any], Any]
    ) -> Callable[[Any, Any], Any]:
        # cattrs' own hooks iterate whatever they get (a string becomes a list of characters);
        # check the container type first so the error says what was expected.
        def structure(value: Any, _: Any) -> Any:
            if not accepts(value):
                raise _wrong(tp, value)
            return inner(value, tp)

        return structure

    def is_table(value: Any) -> bool:
        return isinstance(value, Mapping)

    def is_array(value: Any) -> bool:
        return isinstance(value, list | tuple)

    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(bool, structure_bool)
    conv.register_structure_hook(str, structure_str)
    conv.register_structure_hook_factory(
        attrs.has, lambda cl: guard(cl, is_table, make_dict_structure_fn(cl, conv))
    )

    def is_dict_type(tp: Any) -> bool:
        return typing.get_origin(tp) is dict and is_mapping(tp)

    def is_list_type(tp: Any) -> bool:
        return typing.get_origin(tp) is list and is_sequence(tp)

    conv.register_structure_hook_factory(
        is_dict_type, lambda tp: guard(tp, is_table, mapping_structure_factory(tp, conv))
    )
    conv.register_structure_hook_factory(
        is_list_type, lambda tp: guard(tp, is_array, list_structure_factory(tp, conv))
    )
    return conv


CONVERTER = _converter()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _problems(exc: BaseException, path: str, tp: Any) -> list[tuple[str, str]]:
    """Walk a cattrs exception tree: (dotted key, what is wrong) for every leaf."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = sorted(attrs.fields_dict(exc.cl)) if attrs.has(exc.cl) else []
        out = []
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            out.append((_join(path, key), f"unknown key ({hint})"))
        return out
    if isinstance(exc, ClassValidationError | IterableValidationError):
        out = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            if isinstance(note, AttributeValidationNote):
                sub_path = _join(path, note.name)
            elif isinstance(note.index, int):
                sub_path = f"{path}[{note.index}]"
            else:
                sub_path = _join(path, str(note.index))
            out.extend(_problems(sub, sub_path, note.type))
        for sub in without:
            out.extend(_problems(sub, path, None))
        return out
    if isinstance(exc, KeyError):
        expected = f" ({describe_type(tp)})" if tp is not None else ""
        return [(path, f"required key is missing{expected}")]
    if isinstance(exc, _WrongValue):
        return [(path, str(exc))]
    expected = f" (expected {describe_type(tp)})" if tp is not None else ""
    return [(path, f"{type(exc).__name__}: {exc}{expected}")]


def _value_problems(config: Config) -> list[tuple[str, str]]:
    """Range and format checks that types alone cannot express."""
    problems: list[tuple[str, str]] = []

    def at_least(key: str, value: float, low: float, strict: bool = False) -> None:
        ok = value > low if strict else value >= low
        if not ok or math.isnan(value):
            problems.append((key, f"must be {'>' if strict else '>='} {low}, got {value}"))

    def address(key: str, value: str, optional: bool) -> None:
        if optional and not value:
            return
        try:
            parse_host_port(value)
        except ValueError as exc:
            problems.append((key, str(exc)))

    def one_of(key: str, value: str, allowed: Sequence[str]) -> None:
        if value.lower() not in allowed:
            problems.append((key, f"expected one of {', '.join(allowed)}, got {value!r}"))

    if not config.node.id or "|" in config.node.id:
        problems.append(
            ("node.id", f"must be non-empty and must not contain '|', got {config.node.id!r}")
        )
    if not config.agent.socket:
        problems.append(("agent.socket", "must be a path, got an empty string"))
    address("agent.listen", config.agent.listen, optional=True)
    address("agent.metrics_listen", config.agent.metrics_listen, optional=True)
    at_least("agent.shutdown_grace_s", config.agent.shutdown_grace_s, 0)
    address("router.listen", config.router.listen, optional=False)
    address("router.grpc_listen", config.router.grpc_listen, optional=True)
    if config.router.agent and not config.router.agent.startswith("unix:"):
        address("router.agent", config.router.agent, optional=False)
    at_least("router.max_body_bytes", config.router.max_body_bytes, 1)
    at_least("router.connect_timeout_s", config.router.connect_timeout_s, 0, strict=True)
    at_least("router.read_timeout_s", config.router.read_timeout_s, 0, strict=True)
    at_least("router.max_attempts", config.router.max_attempts, 1)
    at_least("router.models_cache_s", config.router.models_cache_s, 0)
    at_least("router.retry_after_s", config.router.retry_after_s, 0)
    problems.extend(_admission_problems(config.router.admission))
    problems.extend(_resilience_problems(config.router))
    sources: list[tuple[str, RuntimeConfig | GpuConfig]] = [
        *((f"runtimes[{i}]", r) for i, r in enumerate(config.runtimes)),
        *((f"gpus[{i}]", g) for i, g in enumerate(config.gpus)),
    ]
    for key, source in sources:
        if not source.kind:
            problems.append((f"{key}.kind", "must name an adapter kind, got an empty string"))
        if isinstance(source, RuntimeConfig) and not source.url.startswith(("http://", "https://")):
            problems.append(
                (f"{key}.url", f"expected an http:// or https:// URL, got {source.url!r}")
            )
        at_least(f"{key}.poll_interval_s", source.poll_interval_s, 0, strict=True)
        at_least(f"{key}.timeout_s", source.timeout_s, 0, strict=True)
        if isinstance(source, RuntimeConfig):
            for j, uuid in enumerate(source.gpus):
                if not uuid.strip() or "," in uuid:
                    problems.append((f"{key}.gpus[{j}]", f"expected a GPU UUID, got {uuid!r}"))
    for name, weight in config.scoring.weights.items():
        at_least(f"scoring.weights.{name}", weight, 0)
    at_least("scoring.stale_after_s", config.scoring.stale_after_s, 0, strict=True)
    at_least("scoring.prefix_load_factor", config.scoring.prefix_load_factor, 1)
    alpha = config.scoring.outcome_ewma_alpha
    if not 0 < alpha <= 1:
        problems.append(("scoring.outcome_ewma_alpha", f"must be in (0, 1], got {alpha}"))
    one_of("logging.level", config.logging.level, LOG_LEVELS)
    one_of("logging.format", config.logging.format, LOG_FORMATS)
    one_of("router.scoring", config.router.scoring, ("local", "agent"))
    one_of("router.server", config.router.server, ("uvicorn", "hypercorn"))
    problems.extend(_router_http_problems(config.router.http))
    problems.extend(_gossip_problems(config.gossip))
    if config.raft is not None:
        problems.extend(_raft_problems(config.raft))
    problems.extend(_control_problems(config.control))
    if config.policy is not None:
        problems.extend(_policy_problems(config.policy, config))
    return problems


def _resilience_problems(router: RouterConfig) -> list[tuple[str, str]]:
    """`[router.hedging]`, `[router.retries]` and `[router.breaker]` ranges."""
    problems: list[tuple[str, str]] = []
    hedging, retries, breaker = router.hedging, router.retries, router.breaker
    checks: list[tuple[str, float, float, bool]] = [
        ("router.hedging.min_delay_s", hedging.min_delay_s, 0, False),
        ("router.hedging.default_delay_s", hedging.default_delay_s, 0, False),
        ("router.hedging.min_samples", hedging.min_samples, 1, False),
        ("router.hedging.window", hedging.window, 1, False),
        ("router.hedging.max_hedges", hedging.max_hedges, 0, False),
        ("router.hedging.budget_ratio", hedging.budget_ratio, 0, False),
        ("router.hedging.budget_burst", hedging.budget_burst, 1, False),
        ("router.retries.max_tokens", retries.max_tokens, 0, True),
        ("router.retries.token_ratio", retries.token_ratio, 0, False),
        ("router.breaker.consecutive_failures", breaker.consecutive_failures, 1, False),
        ("router.breaker.window", breaker.window, 1, False),
        ("router.breaker.min_requests", breaker.min_requests, 1, False),
        ("router.breaker.ejection_s", breaker.ejection_s, 0, True),
    ]
    for key, value, low, strict in checks:
        if (value <= low if strict else value < low) or math.isnan(value):
            problems.append((key, f"must be {'>' if strict else '>='} {low}, got {value}"))
    if not 0 < hedging.quantile < 1:
        problems.append(("router.hedging.quantile", f"must be in (0, 1), got {hedging.quantile}"))
    if hedging.max_delay_s < hedging.min_delay_s:
        problems.append(
            (
                "router.hedging.max_delay_s",
                f"must be >= min_delay_s ({hedging.min_delay_s}), got {hedging.max_delay_s}",
            )
        )
    buckets = hedging.prompt_buckets
    if any(b <= 0 for b in buckets) or buckets != sorted(set(buckets)):
        problems.append(
            (
                "router.hedging.prompt_buckets",
                f"must be increasing positive token counts, got {buckets}",
            )
        )
    if not 0 < breaker.failure_rate <= 1:
        problems.append(
            ("router.breaker.failure_rate", f"must be in (0, 1], got {breaker.failure_rate}")
        )
    if breaker.max_ejection_s < breaker.ejection_s:
        problems.append(
            (
                "router.breaker.max_ejection_s",
                f"must be >= ejection_s ({breaker.ejection_s}), got {breaker.max_ejection_s}",
            )
        )
    return problems


def _admission_problems(admission: AdmissionConfig) -> list[tuple[str, str]]:
    """`[router.admission]` ranges: limits >= 1 (queues >= 0), waits > 0, fractions in (0, 1]."""
    problems: list[tuple[str, str]] = []
    key = "router.admission"

    def fraction(name: str, value: float) -> None:
        if not 0 < value <= 1:
            problems.append((f"{key}.{name}", f"must be in (0, 1], got {value}"))

    if admission.max_concurrent_per_model < 1:
        problems.append(
            (
                f"{key}.max_concurrent_per_model",
                f"must be >= 1, got {admission.max_concurrent_per_model}",
            )
        )
    if not admission.saturation_waiting > 0:
        problems.append(
            (f"{key}.saturation_waiting", f"must be > 0, got {admission.saturation_waiting}")
        )
    fraction("saturation_kv_cache_usage", admission.saturation_kv_cache_usage)
    for name in ("latency", "standard", "batch"):
        limits: SloAdmissionConfig = getattr(admission, name)
        if limits.max_concurrent < 1:
            problems.append(
                (f"{key}.{name}.max_concurrent", f"must be >= 1, got {limits.max_concurrent}")
            )
        if limits.max_queue < 0:
            problems.append((f"{key}.{name}.max_queue", f"must be >= 0, got {limits.max_queue}"))
        if not limits.max_queue_wait_s > 0:
            problems.append(
                (f"{key}.{name}.max_queue_wait_s", f"must be > 0, got {limits.max_queue_wait_s}")
            )
        fraction(f"{name}.shed_at_load", limits.shed_at_load)
    return problems


def _policy_problems(policy: PolicyConfig, config: Config) -> list[tuple[str, str]]:
    """`[policy]` checks: voters to read from, a node identity to present, and no `[raft]`."""
    problems: list[tuple[str, str]] = []
    if config.raft is not None:
        problems.append(
            (
                "policy",
                "[policy] and [raft] cannot both be set: a Raft voter reads its own store; "
                "keep [raft] on voters and [policy] voters on the other agents",
            )
        )
    if not policy.voters:
        problems.append(
            ("policy.voters", "required in [policy]: the Control API HOST:PORT of voter agents")
        )
    for index, voter in enumerate(policy.voters):
        try:
            _, port = parse_host_port(voter)
        except ValueError as exc:
            problems.append((f"policy.voters[{index}]", str(exc)))
            continue
        if port == 0:
            problems.append((f"policy.voters[{index}]", f"needs a real port, got {voter!r}"))
    if len(set(policy.voters)) != len(policy.voters):
        problems.append(("policy.voters", f"names a voter twice: {policy.voters!r}"))
    for key in ("watch_retry_s", "resync_s", "timeout_s"):
        value = getattr(policy, key)
        if not value > 0:
            problems.append((f"policy.{key}", f"must be > 0, got {value}"))
    for name, what in (
        ("cert", "this node's certificate (role node), presented to the voters"),
        ("key", "the PEM private key of control.cert"),
        ("ca", "the PEM CA certificate the voters' certificates are signed by"),
    ):
        if not getattr(config.control, name):
            problems.append((f"control.{name}", f"needed by [policy] voters: {what}"))
    return problems


def _router_http_problems(http: RouterHttpConfig) -> list[tuple[str, str]]:
    """`[router.http]` checks: positive limits, TLS files given together."""
    problems: list[tuple[str, str]] = []
    for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s", "drain_timeout_s"):
        value = getattr(http, key)
        if not value > 0 or math.isnan(value):
            problems.append((f"router.http.{key}", f"must be > 0, got {value}"))
    for key in ("max_header_bytes", "max_connections"):
        if getattr(http, key) < 1:
            problems.append((f"router.http.{key}", f"must be >= 1, got {getattr(http, key)}"))
    if bool(http.tls_cert) != bool(http.tls_key):
        missing = "router.http.tls_key" if http.tls_cert else "router.http.tls_cert"
        problems.append((missing, "tls_cert and tls_key must be set together"))
    return problems


def _control_problems(control: ControlConfig) -> list[tuple[str, str]]:
    """`[control]` checks: with `listen` set, the mutual TLS files are all required."""
    if not control.listen:
        return []
    problems: list[tuple[str, str]] = []
    try:
        parse_host_port(control.listen)
    except ValueError as exc:
        problems.append(("control.listen", str(exc)))
    for name, what in (
        ("cert", "this node's PEM certificate"),
        ("key", "the PEM private key of control.cert"),
        ("ca", "the PEM CA certificate client certificates must be signed by"),
    ):
        if not getattr(control, name):
            problems.append(
                (
                    f"control.{name}",
                    f"required when control.listen is set (the Control API only serves mutual "
                    f"TLS): {what}",
                )
            )
    return problems


def _raft_problems(raft: RaftConfig) -> list[tuple[str, str]]:
    """`[raft]` checks, the same rules `RaftOptions.from_mapping` applies when the store starts."""
    problems: list[tuple[str, str]] = []

    def host_port(key: str, value: str) -> bool:
        try:
            _, port = parse_host_port(value)
        except ValueError as exc:
            problems.append((key, str(exc)))
            return False
        if port == 0:
            problems.append((key, f"needs a real port (1-65535), got {value!r}"))
            return False
        return True

    if not raft.listen:
        problems.append(("raft.listen", "required in [raft]: this voter's HOST:PORT"))
    else:
        host_port("raft.listen", raft.listen)
    voters_ok = all(host_port(f"raft.voters[{i}]", v) for i, v in enumerate(raft.voters))
    if voters_ok and raft.voters:
        if raft.listen and raft.listen not in raft.voters:
            problems.append(
                ("raft.voters", f"must include raft.listen {raft.listen!r}, got {raft.voters!r}")
            )
        if len(set(raft.voters)) != len(raft.voters):
            problems.append(("raft.voters", f"names a voter twice: {raft.voters!r}"))
    if raft.password and raft.password_file:
        problems.append(("raft.password_file", "set raft.password or raft.password_file, not both"))
    voter_count = len(raft.voters)
    if voter_count > 1 and not raft.password and not raft.password_file:
        problems.append(
            (
                "raft.password_file",
                f"required with {voter_count} voters (Raft messages are pickled; the password "
                "encrypts and authenticates them): set raft.password_file (or raft.password) "
                "to the same secret on every voter",
            )
        )
    timeouts = raft.election_timeout_s
    if len(timeouts) != 2 or not 0 < timeouts[0] < timeouts[1]:
        problems.append(
            ("raft.election_timeout_s", f"must be [min, max] with 0 < min < max, got {timeouts}")
        )
    elif not 0 < raft.heartbeat_s < timeouts[0]:
        problems.append(
            (
                "raft.heartbeat_s",
                f"must be > 0 and below the election timeout ({timeouts[0]}), "
                f"got {raft.heartbeat_s}",
            )
        )
    if not raft.commit_timeout_s > 0:
        problems.append(("raft.commit_timeout_s", f"must be > 0, got {raft.commit_timeout_s}"))
    if not raft.snapshot_after_entries >= 2:
        problems.append(
            ("raft.snapshot_after_entries", f"must be >= 2, got {raft.snapshot_after_entries}")
        )
    if not raft.snapshot_after_s > 0:
        problems.append(("raft.snapshot_after_s", f"must be > 0, got {raft.snapshot_after_s}"))
    return problems


def _read_password_file(config: Config, source: str) -> Config:
    """`raft.password_file` read into `raft.password`, so the store never reads files."""
    raft = config.raft
    if raft is None or not raft.password_file:
        return config
    path = Path(raft.password_file).expanduser()
    try:
        password = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{source}: raft.password_file: cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"{source}: raft.password_file: {str(path)!r} is not UTF-8 text"
        ) from None
    if not password:
        raise ConfigError(f"{source}: raft.password_file: {str(path)!r} is empty")
    return attrs.evolve(config, raft=attrs.evolve(raft, password=password))


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
_KEYGEN_HINT = (
    "run `infermesh agent gossip keygen > gossip.key` and set gossip.key_file to that file "
    "(the same file on every node), or set gossip.insecure = true for plaintext gossip"
)


def _gossip_problems(gossip: GossipConfig) -> list[tuple[str, str]]:
    """`[gossip]` checks; those that only matter for a running mesh apply when enabled."""
    problems: list[tuple[str, str]] = []

    def host_port(key: str, value: str, *, port_zero_ok: bool) -> tuple[str, int] | None:
        try:
            host, port = parse_host_port(value)
        except ValueError as exc:
            problems.append((key, str(exc)))
            return None
        if port == 0 and not port_zero_ok:
            problems.append((key, f"needs a real port (1-65535), got {value!r}"))
            return None
        return host, port

    bind = host_port("gossip.bind", gossip.bind, port_zero_ok=True)
    advertise = None
    if gossip.advertise:
        advertise = host_port("gossip.advertise", gossip.advertise, port_zero_ok=False)
        if advertise is not None and advertise[0] in _WILDCARD_HOSTS:
            problems.append(
                (
                    "gossip.advertise",
                    f"must be an address others can reach, got {gossip.advertise!r}",
                )
            )
    for index, seed in enumerate(gossip.seeds):
        host_port(f"gossip.seeds[{index}]", seed, port_zero_ok=False)
    if gossip.profile.lower() not in ("lan", "wan"):
        problems.append(("gossip.profile", f"expected one of lan, wan, got {gossip.profile!r}"))
    if not 0 <= gossip.inject_loss < 1:
        problems.append(("gossip.inject_loss", f"must be in [0, 1), got {gossip.inject_loss}"))
    for name, value in (
        ("probe_interval_s", gossip.probe_interval_s),
        ("probe_timeout_s", gossip.probe_timeout_s),
        ("suspicion_mult", gossip.suspicion_mult),
        ("gossip_interval_s", gossip.gossip_interval_s),
        ("push_pull_interval_s", gossip.push_pull_interval_s),
    ):
        if not value >= 0:
            problems.append((f"gossip.{name}", f"must be >= 0 (0: the profile's), got {value}"))
    if 0 < gossip.probe_interval_s < gossip.probe_timeout_s:
        problems.append(
            (
                "gossip.probe_timeout_s",
                f"must not exceed gossip.probe_interval_s ({gossip.probe_interval_s}), "
                f"got {gossip.probe_timeout_s}",
            )
        )
    if not gossip.enabled:
        return problems
    if not gossip.key_file and not gossip.insecure:
        problems.append(("gossip.key_file", f"required when gossip is enabled: {_KEYGEN_HINT}"))
    if bind is not None and bind[0] in _WILDCARD_HOSTS and not gossip.advertise:
        problems.append(
            (
                "gossip.advertise",
                f"required when gossip.bind listens on every interface ({gossip.bind!r}): "
                "set the host:port other nodes reach this one at, e.g. 10.0.0.5:7946",
            )
        )
    return problems


def structure_config(raw: Mapping[str, Any], source: str) -> Config:
    """Turn a plain mapping into Config, or raise ConfigError naming source, key and type."""
    try:
        config = CONVERTER.structure(dict(raw), Config)
    except Exception as exc:
        problems = _problems(exc, "", Config)
    else:
        problems = _value_problems(config)
        if not problems:
            return config
    lines = [f"{source}: {key or '(top level)'}: {what}" for key, what in problems]
    raise ConfigError("\n".join(lines)) from None


# --------------------------------------------------------------------------- sources


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(target: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set `a.b.c` in nested dicts."""
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {dotted}: {part!r} is not a table")
        node = child
    node[parts[-1]] = value


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X (an optional table such as `[raft]`); any other type unchanged."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(arg for arg in args if arg is not type(None))
    return tp


def _declared_type(dotted: str) -> Any:
    """The declared type of a dotted Config key, or None when no such key exists."""
    tp: Any = Config
    for part in dotted.split("."):
        tp = _unwrap_optional(tp)
        if attrs.has(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def _parse_env_value(text: str, tp: Any) -> Any:
    """An environment value as its key's type expects it.

    Strings stay verbatim (so `INFERMESH_NODE__ID=007` is the string "007"); a list of strings
    may be a comma list; everything else is read as a TOML literal when it parses as one.
    """
    if tp is str:
        return text
    if tp == list[str] and not text.lstrip().startswith("["):
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _env_keys(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(variable name, dotted key) for every variable that addresses a config key."""
    top_level = set(attrs.fields_dict(Config))
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if "." in dotted or dotted in top_level:
            out.append((name, dotted))
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`INFERMESH_ROUTER__LISTEN=0.0.0.0:8080` -> {"router": {"listen": "0.0.0.0:8080"}}."""
    out: dict[str, Any] = {}
    for name, dotted in _env_keys(environ):
        value = _parse_env_value(environ[name], _declared_type(dotted))
        _set_dotted(out, dotted, value, f"environment variable {name}")
    return out


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file at `path` as a dict; ConfigError when missing, unreadable or invalid."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from None


Override = tuple[str, Any] | tuple[str, Any, str]


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[Override] = (),
) -> Config:
    """Load Config from `path` (or `$INFERMESH_CONFIG`), the environment, then `overrides`.

    `overrides` come from CLI flags: `(dotted.key, value)` or `(dotted.key, value, "--flag")`;
    a value of None (flag not given) is ignored, and a key ending in `[]` (`runtimes[]`)
    appends to a list. Each source is validated as it is merged, so an error names the file,
    environment variable or flag that introduced it.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_CONFIG_PATH):
        path = env[ENV_CONFIG_PATH]
    merged: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        merged = read_toml(Path(path))
        structure_config(merged, source)
    for name, dotted in _env_keys(env):
        source = f"environment variable {name}"
        single: dict[str, Any] = {}
        _set_dotted(single, dotted, _parse_env_value(env[name], _declared_type(dotted)), source)
        merged = _deep_merge(merged, single)
        structure_config(merged, source)
    for override in overrides:
        dotted, value = override[0], override[1]
        if value is None:
            continue
        source = (
            f"command-line flag {override[2]}"
            if len(override) == 3
            else f"command-line override of {dotted}"
        )
        key = dotted
        if dotted.endswith("[]"):
            key = dotted[:-2]
            existing = _get_dotted(merged, key)
            if not isinstance(existing, list):
                raise ConfigError(f"{source}: {key}: expected an array, got {_show(existing)}")
            value = [*existing, value]
        single = {}
        _set_dotted(single, key, value, source)
        merged = _deep_merge(merged, single)
        structure_config(merged, source)
    return _read_password_file(structure_config(merged, source), source)


def _get_dotted(raw: Mapping[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return []
        node = node[part]
    return node

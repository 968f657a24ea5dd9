"""InferMesh configuration: one TOML file, then `INFERMESH_*` environment, then CLI flags.

Later sources override earlier ones key by key. Validation errors name the source (file path,
environment variable or flag), the dotted key and the expected type, so an operator can fix them.
This module never reads files or the environment unless `load_config` is called.
"""

from __future__ import annotations

import os
import socket
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

__all__ = [
    "AgentConfig",
    "Config",
    "ConfigError",
    "GpuConfig",
    "LoggingConfig",
    "NodeConfig",
    "PluginsConfig",
    "RouterConfig",
    "RuntimeConfig",
    "ScoringConfig",
    "default_agent_socket",
    "load_config",
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


@attrs.define
class NodeConfig:
    id: str = attrs.field(factory=socket.gethostname)
    zone: str = ""


@attrs.define
class RuntimeConfig:
    """One `[[runtimes]]` table: an inference server the agent watches."""

    kind: str
    url: str
    name: str = ""
    poll_interval_s: float = 1.0
    timeout_s: float = 2.0
    transport: str = "openai-http"
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class GpuConfig:
    """One `[[gpus]]` table: a GPU telemetry source the agent watches."""

    kind: str
    url: str = ""
    name: str = ""
    poll_interval_s: float = 1.0
    timeout_s: float = 2.0
    options: dict[str, Any] = attrs.field(factory=dict)


@attrs.define
class ScoringConfig:
    weights: dict[str, float] = attrs.field(factory=dict)
    """Scorer name -> weight; unnamed scorers use their default weight; 0 disables one."""
    stale_after_s: float = 5.0
    """A target whose telemetry is older than this is filtered out."""
    prefix_load_factor: float = 1.25
    """Bounded-load factor c: a prefix stays on its replica while that replica's load is below
    c times the mean load of the candidates."""
    outcome_ewma_alpha: float = 0.2


@attrs.define
class AgentConfig:
    socket: str = attrs.field(factory=default_agent_socket)
    """Unix domain socket of the Scoring and State APIs."""
    listen: str = ""
    """Optional TCP `host:port` for the same APIs (empty: UDS only)."""
    metrics_listen: str = "127.0.0.1:9464"
    """`host:port` of the Prometheus /metrics endpoint (empty: disabled)."""
    shutdown_grace_s: float = 5.0


@attrs.define
class RouterConfig:
    listen: str = "127.0.0.1:8080"
    agent: str = ""
    """gRPC target of the local agent: `unix:///path` or `host:port`; empty uses agent.socket."""
    max_body_bytes: int = 8 * 1024 * 1024
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    max_attempts: int = 2
    """Attempts per request on distinct targets, only before the first byte is relayed."""
    server: str = "uvicorn"
    """Ingress HTTP server: `uvicorn` (uvloop + httptools)."""
    models_cache_s: float = 1.0
    retry_after_s: float = 1.0


@attrs.define
class PluginsConfig:
    allow: list[str] = attrs.field(factory=list)
    """Only these entry-point names are loaded (empty: all)."""
    block: list[str] = attrs.field(factory=list)
    """These entry-point names are never loaded."""
    strict: bool = False
    """A plugin that fails to load is fatal instead of reported and skipped."""


@attrs.define
class LoggingConfig:
    level: str = "info"
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
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)

    def agent_target(self) -> str:
        """The gRPC target a router or CLI uses to reach the local agent."""
        if self.router.agent:
            return self.router.agent
        return f"unix://{self.agent.socket}"


def _converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError(f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got boolean {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise TypeError(f"expected an integer, got {value!r}")
        return int(value)

    def structure_bool(value: Any, _: type) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise TypeError(f"expected a boolean, got {type(value).__name__} {value!r}")

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__} {value!r}")
        return value

    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(bool, structure_bool)
    conv.register_structure_hook(str, structure_str)
    return conv


CONVERTER = _converter()


def _first_error(exc: BaseException, path: str) -> tuple[str, str]:
    """Walk a cattrs exception group down to the first leaf: (dotted key, message)."""
    if isinstance(exc, ForbiddenExtraKeysError):
        keys = ", ".join(sorted(exc.extra_fields))
        prefix = f"{path}." if path else ""
        return f"{prefix}{keys}", "unknown key (check the spelling)"
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            note = next(iter(getattr(sub, "__notes__", [])), "")
            name = ""
            if isinstance(exc, ClassValidationError) and "attribute" in note:
                name = note.split("attribute", 1)[1].split("(", 1)[0].strip()
            elif isinstance(exc, IterableValidationError) and "index" in note:
                name = "[" + note.split("index", 1)[1].split()[0] + "]"
            if name.startswith("["):
                sub_path = f"{path}{name}"
            else:
                sub_path = f"{path}.{name}" if path and name else (name or path)
            return _first_error(sub, sub_path)
    if isinstance(exc, KeyError):
        return path, "required key is missing"
    return path, str(exc)


def _expected_type(key: str) -> str:
    """The declared type of a dotted key of Config, for error messages."""
    cls: Any = Config
    field_type: Any = Config
    for part in key.replace("[", ".[").split("."):
        if not part or part.startswith("["):
            args = getattr(field_type, "__args__", ())
            if args:
                cls = field_type = args[0]
            continue
        if not attrs.has(cls):
            return ""
        fields = attrs.fields_dict(cls)
        if part not in fields:
            return ""
        field_type = fields[part].type
        cls = field_type
    return getattr(field_type, "__name__", str(field_type))


def structure_config(raw: Mapping[str, Any], source: str) -> Config:
    """Turn a plain mapping into Config, or raise ConfigError naming source, key and type."""
    try:
        return CONVERTER.structure(dict(raw), Config)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as exc:
        key, message = _first_error(exc, "")
        expected = _expected_type(key)
        hint = f" (expected {expected})" if expected and "unknown key" not in message else ""
        raise ConfigError(f"{source}: invalid value for {key!r}: {message}{hint}") from None


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a table")
        node = child
    node[parts[-1]] = value


def _parse_env_value(text: str) -> Any:
    """Environment values are TOML literals when they parse as one, else plain strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """`INFERMESH_ROUTER__LISTEN=0.0.0.0:8080` -> {"router": {"listen": "0.0.0.0:8080"}}."""
    out: dict[str, Any] = {}
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in _ENV_NOT_KEYS:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if "." not in dotted:
            continue
        _set_dotted(out, dotted, _parse_env_value(text))
    return out


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[tuple[str, Any]] = (),
) -> Config:
    """Load Config from `path` (or `$INFERMESH_CONFIG`), the environment, then `overrides`.

    `overrides` are `(dotted.key, value)` pairs from CLI flags; each source is validated on its
    own first so an error names the source that introduced it.
    """
    env = os.environ if environ is None else environ
    if path is None and env.get(ENV_CONFIG_PATH):
        path = env[ENV_CONFIG_PATH]
    merged: dict[str, Any] = {}
    if path is not None:
        file_raw = read_toml(Path(path))
        structure_config(file_raw, str(path))
        merged = file_raw
    env_raw = env_overrides(env)
    if env_raw:
        for name in (n for n in env if n.startswith(ENV_PREFIX) and n not in _ENV_NOT_KEYS):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            if "." in dotted:
                single: dict[str, Any] = {}
                _set_dotted(single, dotted, _parse_env_value(env[name]))
                structure_config(_deep_merge(merged, single), f"environment variable {name}")
        merged = _deep_merge(merged, env_raw)
    for dotted, value in overrides:
        if value is None:
            continue
        single = {}
        _set_dotted(single, dotted, value)
        flag = "--" + dotted.split(".")[-1].replace("_", "-")
        structure_config(_deep_merge(merged, single), f"command-line flag {flag}")
        merged = _deep_merge(merged, single)
    return structure_config(merged, str(path) if path else "configuration")

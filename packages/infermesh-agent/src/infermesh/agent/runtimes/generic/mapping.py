"""Metric-name mappings: which Prometheus series feed which ModelState field, and how.

Loads and validates a mapping TOML (shipped per runtime, or an operator's file for kind
`generic`); every mistake is a MappingError naming the file and the key. Never does network I/O.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

from infermesh.core.config import ConfigError

__all__ = [
    "FIELDS",
    "HEALTH_CHECKS",
    "MODEL_SOURCES",
    "SHIPPED",
    "UNITS",
    "MappingError",
    "MetricMapping",
    "Signal",
    "load_mapping_file",
    "parse_mapping",
    "shipped_mapping",
]

SHIPPED = ("tgi", "sglang", "torchserve", "tfserving", "ovms")
"""Runtime kinds with a mapping in the package (`mappings/<kind>.toml`)."""

UNITS: Mapping[str, float] = {
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "ns": 1e-9,
    "fraction": 1.0,
    "percent": 0.01,
    "count": 1.0,
}
"""Unit names a mapping may give, with the factor to InferMesh's unit (s, fraction, count)."""

_TIME_UNITS = ("s", "ms", "us", "ns")
_RATIO_UNITS = ("fraction", "percent")

TYPES = ("gauge", "counter_rate", "histogram_mean", "counter_ratio")
"""How series become a value: a gauge as is, a counter's rate per second, a histogram's or
summary's mean over the last interval (`_sum`/`_count` deltas), or one counter's increase
divided by another's (`metric` / `per`) over the last interval."""

# field -> (allowed types, allowed units, default unit)
FIELDS: Mapping[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "running": (("gauge",), ("count",), "count"),
    "waiting": (("gauge",), ("count",), "count"),
    "kv_cache_usage": (("gauge",), _RATIO_UNITS, "fraction"),
    "prefix_cache_hit_rate": (("gauge", "counter_ratio"), _RATIO_UNITS, "fraction"),
    "ttft_s": (("histogram_mean", "counter_ratio", "gauge"), _TIME_UNITS, "s"),
    "itl_s": (("histogram_mean", "counter_ratio", "gauge"), _TIME_UNITS, "s"),
    "e2e_s": (("histogram_mean", "counter_ratio", "gauge"), _TIME_UNITS, "s"),
    "prompt_tokens_per_s": (("counter_rate",), ("count",), "count"),
    "generation_tokens_per_s": (("counter_rate",), ("count",), "count"),
    "max_num_seqs": (("gauge",), ("count",), "count"),
}
"""The ModelState fields a mapping can fill."""

HEALTH_CHECKS = ("status", "model_status")
"""`status`: any 2xx from the health path is healthy. `model_status`: the path holds `{model}`
and answers TF Serving's model status JSON; a model is healthy when a version is AVAILABLE."""

MODEL_SOURCES = ("config", "openai", "torchserve", "ovms_config", "metrics")
"""Where the served model names come from: `options.models` only; an OpenAI `/v1/models` list;
TorchServe's management `GET /models`; OVMS `GET /v1/config`; the model label's values on the
metrics page."""

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


class MappingError(ConfigError):
    """A mapping file is invalid; the message names the file, the key and what was expected."""


@attrs.frozen
class Signal:
    """How one ModelState field is read from the page."""

    field: str
    metric: str
    type: str
    unit: str
    per: str = ""
    """Denominator counter of a `counter_ratio`."""
    labels: Mapping[str, str] = attrs.field(factory=dict)
    """Only series carrying these label values count (e.g. `{status = "OK"}`)."""
    aggregate: str = "sum"
    """Several series of one model: `sum` them, or take the `max` (a fullest cache)."""

    @property
    def factor(self) -> float:
        return UNITS[self.unit]

    @property
    def families(self) -> frozenset[str]:
        """Sample names this signal reads."""
        if self.type == "histogram_mean":
            return frozenset({self.metric + "_sum", self.metric + "_count"})
        if self.type == "counter_ratio":
            return frozenset({self.metric, self.per})
        return frozenset({self.metric})


@attrs.frozen
class MetricMapping:
    """One runtime's mapping: endpoints, how models are found, and the signals."""

    runtime: str
    """The `runtime` label of the targets (`tgi`, `sglang`, ...)."""
    title: str
    metrics_path: str = "/metrics"
    metrics_port: int | None = None
    """Another port on the runtime's host serving the metrics (TorchServe: 8082)."""
    model_label: str = ""
    """The label naming the model on each series; empty when the server serves one model and
    every series belongs to it."""
    health_path: str = "/health"
    health_check: str = "status"
    models_source: str = "config"
    models_path: str = ""
    models_port: int | None = None
    signals: Mapping[str, Signal] = attrs.field(factory=dict)
    source: str = ""
    """Where the mapping was read from (for messages)."""

    @property
    def families(self) -> frozenset[str]:
        found: set[str] = set()
        for signal in self.signals.values():
            found |= signal.families
        return frozenset(found)


def shipped_mapping(kind: str) -> MetricMapping:
    """The mapping shipped for `kind` (one of SHIPPED)."""
    if kind not in SHIPPED:
        raise MappingError(f"no shipped mapping for kind {kind!r}; shipped: {', '.join(SHIPPED)}")
    resource = resources.files("infermesh.agent.runtimes.generic") / "mappings" / f"{kind}.toml"
    return parse_mapping(resource.read_text(encoding="utf-8"), f"shipped mapping {kind}.toml")


def load_mapping_file(path: str | Path) -> MetricMapping:
    """An operator's mapping file; MappingError says what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingError(f"mapping file {str(path)!r} cannot be read: {exc.strerror}") from None
    return parse_mapping(text, f"mapping file {str(path)!r}")


def parse_mapping(text: str, source: str) -> MetricMapping:
    """A mapping from TOML text; `source` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{source}: not valid TOML ({exc})") from None
    reader = _Reader(document, source)
    top = reader.table(document, "", {"runtime", "title", "metrics", "health", "models", "signals"})
    runtime = reader.string(top, "runtime", required=True)
    metrics = reader.table(top.get("metrics", {}), "metrics", {"path", "port", "model_label"})
    health = reader.table(top.get("health", {}), "health", {"path", "check"})
    models = reader.table(top.get("models", {}), "models", {"source", "path", "port"})
    model_label = reader.string(metrics, "metrics.model_label")
    if model_label and not _LABEL.fullmatch(model_label):
        raise MappingError(f"{source}: metrics.model_label {model_label!r} is not a label name")
    health_check = reader.choice(health, "health.check", HEALTH_CHECKS, "status")
    health_path = reader.path(health, "health.path", "/health")
    if health_check == "model_status" and "{model}" not in health_path:
        raise MappingError(
            f"{source}: health.path must contain {{model}} when health.check is model_status"
        )
    models_source = reader.choice(models, "models.source", MODEL_SOURCES, "config")
    models_path = reader.path(models, "models.path", "")
    if models_source in ("openai", "torchserve", "ovms_config") and not models_path:
        raise MappingError(
            f"{source}: models.path is required when models.source is {models_source}"
        )
    if models_source == "metrics" and not model_label:
        raise MappingError(
            f"{source}: models.source = 'metrics' needs metrics.model_label (the label whose "
            "values name the models)"
        )
    signals_table = reader.table(top.get("signals", {}), "signals", set(FIELDS))
    signals = {field: _signal(reader, field, value) for field, value in signals_table.items()}
    return MetricMapping(
        runtime=runtime,
        title=reader.string(top, "title") or runtime,
        metrics_path=reader.path(metrics, "metrics.path", "/metrics"),
        metrics_port=reader.port(metrics, "metrics.port"),
        model_label=model_label,
        health_path=health_path,
        health_check=health_check,
        models_source=models_source,
        models_path=models_path,
        models_port=reader.port(models, "models.port"),
        signals=signals,
        source=source,
    )


def _signal(reader: _Reader, field: str, value: Any) -> Signal:
    key = f"signals.{field}"
    table = reader.table(value, key, {"metric", "type", "unit", "per", "labels", "aggregate"})
    types, units, default_unit = FIELDS[field]
    signal_type = reader.choice(table, f"{key}.type", types, types[0])
    metric = reader.metric(table, f"{key}.metric", required=True)
    per = reader.metric(table, f"{key}.per", required=signal_type == "counter_ratio")
    if per and signal_type != "counter_ratio":
        raise MappingError(f"{reader.source}: {key}.per is only for type counter_ratio")
    labels = reader.table(table.get("labels", {}), f"{key}.labels", None)
    for name, wanted in labels.items():
        if not _LABEL.fullmatch(name) or not isinstance(wanted, str):
            raise MappingError(
                f"{reader.source}: {key}.labels.{name} must map a label name to a string"
            )
    return Signal(
        field=field,
        metric=metric,
        type=signal_type,
        unit=reader.choice(table, f"{key}.unit", units, default_unit),
        per=per,
        labels=dict(labels),
        aggregate=reader.choice(
            table, f"{key}.aggregate", ("sum", "max"), "max" if field == "kv_cache_usage" else "sum"
        ),
    )


class _Reader:
    """Typed access to TOML values; every error names the source and the key."""

    def __init__(self, document: Mapping[str, Any], source: str) -> None:
        self.document = document
        self.source = source

    def fail(self, key: str, expected: str, got: Any) -> MappingError:
        return MappingError(f"{self.source}: {key} must be {expected}, got {got!r}")

    def table(self, value: Any, key: str, allowed: set[str] | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key or "the document", "a table", value)
        if allowed is not None:
            unknown = sorted(set(value) - allowed)
            if unknown:
                where = f"{key}." if key else ""
                raise MappingError(
                    f"{self.source}: unknown key(s) {', '.join(where + u for u in unknown)}; "
                    f"expected any of: {', '.join(sorted(allowed))}"
                )
        return value

    def string(self, table: Mapping[str, Any], key: str, *, required: bool = False) -> str:
        name = key.rsplit(".", 1)[-1]
        if name not in table:
            if required:
                raise MappingError(f"{self.source}: {key} is required")
            return ""
        value = table[name]
        if not isinstance(value, str) or (required and not value):
            raise self.fail(key, "a non-empty string" if required else "a string", value)
        return value

    def choice(
        self, table: Mapping[str, Any], key: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.string(table, key) or default
        if value not in choices:
            raise self.fail(key, f"one of {', '.join(choices)}", value)
        return value

    def path(self, table: Mapping[str, Any], key: str, default: str) -> str:
        value = self.string(table, key) or default
        if value and not value.startswith("/"):
            raise self.fail(key, "a path starting with /", value)
        return value

    def metric(self, table: Mapping[str, Any], key: str, *, required: bool) -> str:
        value = self.string(table, key, required=required)
        if value and not _NAME.fullmatch(value):
            raise self.fail(key, "a Prometheus metric name", value)
        return value

    def port(self, table: Mapping[str, Any], key: str) -> int | None:
        name = key.rsplit(".", 1)[-1]
        value = table.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
            raise self.fail(key, "a port number (1-65535)", value)
        return value

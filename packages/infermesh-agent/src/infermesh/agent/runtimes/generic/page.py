"""Read what a mapped runtime answers: its metrics page, its model list, its health answers.

Sans-I/O and clock-free: text in, readings out, or GenericPageError saying which endpoint was
unreadable and why. Never computes rates or means (see states.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from infermesh.agent.runtimes.generic.mapping import MetricMapping, Signal
from infermesh.core.prometheus import MetricsParseError, Sample, parse_samples

__all__ = [
    "GenericPageError",
    "Observed",
    "PageReading",
    "model_health",
    "read_models",
    "read_page",
    "server_health",
]

# Any line of a classic-text page: blank, a comment, or `name{labels} value [timestamp]`.
_SAMPLE_LINE = re.compile(r"[ \t]*(?:#.*|[a-zA-Z_:][a-zA-Z0-9_:]*[ \t]*(?:\{.*\})?[ \t]+\S+.*)?")


class GenericPageError(ValueError):
    """A runtime endpoint answered something this adapter cannot read; `path` names it."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


@attrs.frozen
class Observed:
    """One field's raw reading for one model: a gauge or counter total, or a ratio's two sums."""

    value: float
    count: float = 0.0
    """The denominator of a histogram mean or counter ratio (an observation count)."""


@attrs.frozen
class PageReading:
    """Everything a metrics page said, taken at `taken_at` (Unix seconds)."""

    taken_at: float
    models: Mapping[str, Mapping[str, Observed]]
    """Per model-label value (`""` when the mapping has no model label), per field."""


def read_page(text: str, mapping: MetricMapping, now: float) -> PageReading:
    """Read a metrics page through `mapping`. Missing series are normal: the field is absent."""
    _check_exposition(text, mapping.metrics_path)
    try:
        found = parse_samples(text, mapping.families)
    except MetricsParseError as exc:
        raise GenericPageError(f"malformed metrics page, {exc}", mapping.metrics_path) from None
    models: dict[str, dict[str, Observed]] = {}
    for field, signal in mapping.signals.items():
        for model, observed in _observe(signal, found, mapping.model_label).items():
            models.setdefault(model, {})[field] = observed
    return PageReading(taken_at=now, models=models)


def _check_exposition(text: str, path: str) -> None:
    # The sample parser skips lines it was not asked for, so an HTML error page or a JSON body
    # would read as "no series"; one cheap pass tells a wrong endpoint from a quiet runtime.
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not _SAMPLE_LINE.fullmatch(line):
            excerpt = line.strip()[:80]
            raise GenericPageError(
                f"not a Prometheus text page: line {line_no} is {excerpt!r}", path
            )


def _observe(
    signal: Signal, found: Mapping[str, list[Sample]], model_label: str
) -> dict[str, Observed]:
    """The signal's reading per model, from the samples of the families it reads."""

    def per_model(family: str, names: tuple[str, ...]) -> dict[str, list[float]]:
        grouped: dict[str, list[float]] = {}
        for sample in found.get(family, ()):
            if sample.name not in names or not math.isfinite(sample.value):
                continue
            if any(sample.labels.get(k) != v for k, v in signal.labels.items()):
                continue
            model = sample.labels.get(model_label, "") if model_label else ""
            grouped.setdefault(model, []).append(sample.value)
        return grouped

    if signal.type == "histogram_mean":
        sums = per_model(signal.metric + "_sum", (signal.metric + "_sum",))
        counts = per_model(signal.metric + "_count", (signal.metric + "_count",))
        return {m: Observed(sum(sums[m]), sum(counts[m])) for m in sums if m in counts}
    if signal.type == "counter_ratio":
        sums = per_model(signal.metric, _counter_names(signal.metric))
        counts = per_model(signal.per, _counter_names(signal.per))
        return {m: Observed(sum(sums[m]), sum(counts[m])) for m in sums if m in counts}
    names = _counter_names(signal.metric) if signal.type == "counter_rate" else (signal.metric,)
    combine = max if signal.aggregate == "max" else sum
    return {m: Observed(combine(values)) for m, values in per_model(signal.metric, names).items()}


def _counter_names(metric: str) -> tuple[str, ...]:
    # Exporters differ on the `_total` suffix (TGI's Rust exporter, for one, is unverified).
    return (metric, metric + "_total")


# --------------------------------------------------------------------------- model lists


def read_models(payload: str | bytes, source: str, path: str) -> tuple[str, ...]:
    """Model names from a model-list answer in the format `source` names."""
    try:
        document: Any = json.loads(payload)
    except ValueError as exc:
        raise GenericPageError(f"not JSON ({exc})", path) from None
    if source == "openai":
        entries = document.get("data") if isinstance(document, dict) else None
        return _names(entries, "id", 'an OpenAI model list {"data": [{"id": ...}]}', path)
    if source == "torchserve":
        entries = document.get("models") if isinstance(document, dict) else None
        return _names(entries, "modelName", 'a TorchServe list {"models": [...]}', path)
    if source == "ovms_config":
        if not isinstance(document, dict):
            raise GenericPageError("not an OVMS config status {name: {...}}", path)
        return tuple(sorted(name for name, status in document.items() if _has_available(status)))
    raise GenericPageError(f"model source {source!r} has no list to read", path)


def _names(entries: Any, key: str, expected: str, path: str) -> tuple[str, ...]:
    if not isinstance(entries, list):
        raise GenericPageError(f"not {expected}", path)
    names = []
    for index, entry in enumerate(entries):
        name = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise GenericPageError(f"model entry {index} has no string {key!r}", path)
        names.append(name)
    return tuple(dict.fromkeys(names))


def _has_available(status: Any) -> bool:
    versions = status.get("model_version_status") if isinstance(status, dict) else None
    if not isinstance(versions, list):
        return False
    return any(isinstance(v, dict) and v.get("state") == "AVAILABLE" for v in versions)


# --------------------------------------------------------------------------- health


def server_health(title: str, path: str, status: int) -> tuple[bool, str]:
    """(healthy, reason) from the server health path's status code."""
    if 200 <= status < 300:
        return True, ""
    return False, f"{title} {path} returned HTTP {status}; check the server's log"


def model_health(title: str, model: str, status: int, body: bytes) -> tuple[bool, str]:
    """(healthy, reason) from a TF Serving-style model status answer (`/v1/models/{model}`)."""
    if status == 404:
        return False, f"{title} does not serve model {model!r} (HTTP 404 from its status path)"
    if status != 200:
        return False, f"{title} status of model {model!r} returned HTTP {status}"
    try:
        document: Any = json.loads(body)
    except ValueError:
        return False, f"{title} status of model {model!r} is not JSON"
    if _has_available(document):
        return True, ""
    versions: Sequence[Any] = (
        document.get("model_version_status") or [] if isinstance(document, dict) else []
    )
    states = ", ".join(
        f"version {v.get('version', '?')} {v.get('state', '?')}"
        for v in versions
        if isinstance(v, dict)
    )
    return False, f"{title} model {model!r} has no AVAILABLE version ({states or 'none listed'})"

"""Turn what a Triton server reports (metrics, repository index, health) into ModelState values.

Sans-I/O and clock-free: the caller passes page text, the index JSON, the ready status and
`now`, and keeps the returned reading for the next call (rates and latencies come from the
difference between two readings). Never raises anything but `TritonPageError` for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from infermesh.core.model import Labels, ModelState, TargetKey, finite_or_none
from infermesh.triton.metrics import MetricsReading, TritonPageError, VersionReading

__all__ = [
    "Estimate",
    "IndexEntry",
    "build_states",
    "estimate",
    "health_from_status",
    "read_index",
]

READY = "READY"


@attrs.frozen
class IndexEntry:
    """One row of `POST /v2/repository/index`: a model version and its state."""

    name: str
    version: str = ""
    state: str = ""
    """READY, UNAVAILABLE, LOADING, UNLOADING; empty for a model never loaded."""
    reason: str = ""


@attrs.frozen
class Estimate:
    """What one model (or version) did between two scrapes, in seconds and per second.

    Means are over the requests that finished in the window; with none, over everything since
    the model was loaded (so an idle model keeps its last known latencies). None: no request yet.
    """

    service_rate_rps: float = 0.0
    """Successful requests per second in the window."""
    failure_ratio: float = 0.0
    """Failed / (failed + successful) requests in the window (0 without requests)."""
    e2e_s: float | None = None
    """Mean request duration (queue + compute + overhead)."""
    queue_s: float | None = None
    """Mean time a request waited in the model's queue."""
    compute_s: float | None = None
    """Mean duration of one execution (input + infer + output)."""
    batch_size: float | None = None
    """Mean inferences per execution (dynamic batching)."""
    executing: float = 0.0
    """Mean executions in progress over the window (compute time / wall time)."""
    first_response_s: float | None = None
    """Mean time to first response, when the opt-in histogram is on the page."""


# --------------------------------------------------------------------------- index, health


def read_index(payload: str | bytes, url: str) -> tuple[IndexEntry, ...]:
    """Read a repository index body. Raises TritonPageError if it is not a Triton index."""
    try:
        document: Any = json.loads(payload)
    except ValueError as exc:
        raise TritonPageError(f"repository index is not JSON ({exc})", url) from None
    if not isinstance(document, list):
        raise TritonPageError('repository index is not a JSON list of {"name": ...}', url)
    entries = []
    for index, row in enumerate(document):
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
            raise TritonPageError(f"repository index entry {index} has no string 'name'", url)
        entries.append(
            IndexEntry(
                name=row["name"],
                version=str(row.get("version", "")),
                state=str(row.get("state", "")),
                reason=str(row.get("reason", "")),
            )
        )
    return tuple(entries)


def health_from_status(status: int) -> tuple[bool, str]:
    """(healthy, reason) from the `/v2/health/ready` status code."""
    if status == 200:
        return True, ""
    if status == 400:
        return False, (
            "Triton /v2/health/ready returned 400: the server is not ready (still starting, "
            "or a model failed to load); check the Triton server's log"
        )
    return False, f"Triton /v2/health/ready returned HTTP {status}; check the Triton server's log"


# --------------------------------------------------------------------------- estimates


def _increase(current: float, before: float) -> float:
    # A counter that went down means the model was reloaded (or Triton restarted).
    return current - before if current >= before else current


def estimate(current: VersionReading, before: VersionReading | None, elapsed_s: float) -> Estimate:
    """Rates and mean latencies between two readings of the same model or version."""
    rate = failure_ratio = executing = 0.0
    success = request_us = queue_us = compute_us = inferences = executions = 0.0
    first = None
    if before is not None and elapsed_s > 0:
        success = _increase(current.success, before.success)
        failure = _increase(current.failure, before.failure)
        request_us = _increase(current.request_us, before.request_us)
        queue_us = _increase(current.queue_us, before.queue_us)
        compute_us = _increase(current.compute_us, before.compute_us)
        inferences = _increase(current.inference_count, before.inference_count)
        executions = _increase(current.exec_count, before.exec_count)
        first = current.first_response_ms
        if first is not None and before.first_response_ms is not None:
            first = first - before.first_response_ms
        rate = success / elapsed_s
        failure_ratio = failure / (success + failure) if success + failure > 0 else 0.0
        executing = max(0.0, compute_us / (elapsed_s * 1e6))
    if success <= 0:  # nothing finished in the window: the means since the model was loaded
        success, request_us, queue_us = current.success, current.request_us, current.queue_us
        compute_us = current.compute_us
        inferences, executions = current.inference_count, current.exec_count
        first = current.first_response_ms
    first_ms = first.mean if first is not None else None
    return Estimate(
        service_rate_rps=rate,
        failure_ratio=failure_ratio,
        e2e_s=finite_or_none(request_us / success / 1e6) if success > 0 else None,
        queue_s=finite_or_none(queue_us / success / 1e6) if success > 0 else None,
        compute_s=finite_or_none(compute_us / executions / 1e6) if executions > 0 else None,
        batch_size=finite_or_none(inferences / executions) if executions > 0 else None,
        executing=executing,
        first_response_s=finite_or_none(first_ms / 1000.0) if first_ms is not None else None,
    )


# --------------------------------------------------------------------------- states


def build_states(
    *,
    node: str,
    endpoint: str,
    reading: MetricsReading,
    previous: MetricsReading | None,
    index: Sequence[IndexEntry],
    ready_status: int,
    now: float,
    custom_labels: Mapping[str, str] | None = None,
) -> dict[TargetKey, ModelState]:
    """One ModelState per model the index shows loaded, loading or unloaded.

    Models the repository holds but never loaded are not targets. A model is routable when
    one of its versions is READY and the server is ready.
    """
    server_ok, server_reason = health_from_status(ready_status)
    by_model: dict[str, list[IndexEntry]] = {}
    for entry in index:
        if entry.state:
            by_model.setdefault(entry.name, []).append(entry)
    elapsed_s = reading.taken_at - previous.taken_at if previous is not None else 0.0
    states: dict[TargetKey, ModelState] = {}
    for name, entries in sorted(by_model.items()):
        key = TargetKey(model=name, node=node, endpoint=endpoint)
        ready_versions = sorted(
            (e.version for e in entries if e.state == READY), key=_version_order
        )
        loaded = bool(ready_versions)
        healthy, reason = server_ok, server_reason
        if server_ok and not loaded:
            healthy, reason = False, _not_ready_reason(name, entries)
        current = reading.model(name)
        before = previous.model(name) if previous is not None else None
        figures = estimate(current, before, elapsed_s) if current is not None else Estimate()
        gpu_uuids = current.gpu_uuids if current is not None else ()
        custom = dict(custom_labels or {})
        if ready_versions:
            custom["triton_versions"] = ",".join(ready_versions)
        states[key] = ModelState(
            key=key,
            labels=Labels(
                model=name,
                runtime="triton",
                node=node,
                gpu_uuid=",".join(gpu_uuids),
                custom=custom,
            ),
            running=round(figures.executing, 3),
            waiting=current.pending if current is not None else 0.0,
            ttft_s=figures.first_response_s,
            e2e_s=figures.e2e_s,
            loaded=loaded,
            warming=any(e.state == "LOADING" for e in entries) and not loaded,
            healthy=healthy,
            health_reason=reason,
            last_updated=now,
        )
    return states


def _version_order(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def _not_ready_reason(name: str, entries: Sequence[IndexEntry]) -> str:
    states = sorted({f"{e.state}{f' ({e.reason})' if e.reason else ''}" for e in entries})
    return f"Triton model {name!r} has no READY version: {', '.join(states)}"

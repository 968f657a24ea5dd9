"""Reading llama-server's pages into InferMesh's model state: pure functions, no I/O.

llama.cpp's `llama-server` serves one model and reports on itself through

- `GET /health`: 200 `{"status": "ok"}` once the model is loaded, 503 while it loads;
- `GET /props`: JSON with `model_alias` (older builds: only `model_path`) and `total_slots`;
- `GET /slots`: a JSON array with one object per slot, `is_processing` true while it serves a
  request (501 when the server runs with `--no-slots`);
- `GET /metrics` (with `--metrics`, else 501): Prometheus text, of which this adapter reads
  `llamacpp:requests_deferred` (requests waiting for a slot) and `llamacpp:kv_cache_usage_ratio`.

A slot is a sequence the server decodes in parallel, so busy slots are InferMesh's `running`,
the slot count its `max_num_seqs`, and deferred requests its `waiting`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

import attrs

from infermesh.core.model import Labels, ModelState, ModelStateDelta, TargetKey

__all__ = ["Page", "Poll", "ServerView", "Tracker", "read_poll"]

Page = tuple[int, bytes] | str
"""One page: (HTTP status, body), or why it could not be fetched."""

DEFERRED = "llamacpp:requests_deferred"
KV_USAGE = "llamacpp:kv_cache_usage_ratio"


@attrs.frozen
class Poll:
    """The four pages of one poll of a llama-server."""

    url: str
    health: Page
    props: Page
    slots: Page
    metrics: Page


@attrs.frozen
class ServerView:
    """What one poll says about the server's only model."""

    model: str
    total_slots: int
    busy_slots: int
    deferred: float = 0.0
    kv_cache_usage: float | None = None


class PollProblem(Exception):
    """The server cannot be routed to; the message says why and what to do."""


def _json(url: str, path: str, page: Page) -> Any:
    if isinstance(page, str):
        raise PollProblem(page)
    status, body = page
    if status != 200:
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        hint = " (started with --no-slots? the adapter needs /slots)" if path == "/slots" else ""
        raise PollProblem(f"GET {url}{path} returned HTTP {status} {excerpt!r}{hint}")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise PollProblem(f"GET {url}{path} did not return JSON ({exc})") from None


def _model_of(props: Mapping[str, Any], configured: str, url: str) -> str:
    if configured:
        return configured
    alias = props.get("model_alias")
    if isinstance(alias, str) and alias:
        return alias
    path = props.get("model_path")
    if isinstance(path, str) and path:
        return PurePosixPath(path).name
    raise PollProblem(f"{url}/props names no model; set the runtime's options.model")


def _metrics(text: str) -> dict[str, float]:
    """The two gauges this adapter reads, from Prometheus text (other lines are ignored)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in (DEFERRED, KV_USAGE):
            try:
                found[name] = float(value.split()[0])
            except (ValueError, IndexError):
                continue
    return found


def read_poll(poll: Poll, configured_model: str = "") -> ServerView:
    """The server's state from one poll; PollProblem when it cannot be routed to."""
    if isinstance(poll.health, str):
        raise PollProblem(poll.health)
    status, body = poll.health
    if status != 200:
        excerpt = body[:200].decode("utf-8", errors="replace").strip()
        raise PollProblem(f"llama-server at {poll.url} is not ready: HTTP {status} {excerpt}")
    props = _json(poll.url, "/props", poll.props)
    slots = _json(poll.url, "/slots", poll.slots)
    if not isinstance(props, dict) or not isinstance(slots, list):
        raise PollProblem(f"{poll.url}: /props is not an object or /slots is not an array")
    busy = sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))
    total = props.get("total_slots")
    view = ServerView(
        model=_model_of(props, configured_model, poll.url),
        total_slots=total if isinstance(total, int) and total > 0 else len(slots),
        busy_slots=busy,
    )
    if isinstance(poll.metrics, tuple) and poll.metrics[0] == 200:
        gauges = _metrics(poll.metrics[1].decode("utf-8", errors="replace"))
        usage = gauges.get(KV_USAGE)
        view = attrs.evolve(
            view,
            deferred=max(0.0, gauges.get(DEFERRED, 0.0)),
            kv_cache_usage=None if usage is None else min(1.0, max(0.0, usage)),
        )
    return view


class Tracker:
    """The model state of one llama-server, and the deltas each poll makes."""

    def __init__(self, node: str, endpoint: str, configured_model: str, first_version: int):
        self.node = node
        self.endpoint = endpoint
        self.configured_model = configured_model
        self.version = first_version
        self.states: dict[str, ModelState] = {}
        self.problem = ""
        """Why the server cannot be routed to now ('' when it can)."""

    def _key(self, model: str) -> TargetKey:
        return TargetKey(model=model, node=self.node, endpoint=self.endpoint)

    def observe(self, poll: Poll, now: float) -> list[ModelStateDelta]:
        """Deltas for every model whose state this poll changed."""
        self.version += 1
        try:
            view = read_poll(poll, self.configured_model)
        except PollProblem as exc:
            self.problem = str(exc)
            models = set(self.states) | ({self.configured_model} - {""})
            return self._update(
                {m: {"healthy": False, "health_reason": self.problem} for m in models}, now
            )
        self.problem = ""
        changes: dict[str, dict[str, Any]] = {
            old: {"loaded": False} for old in self.states if old != view.model
        }
        changes[view.model] = {
            "labels": Labels(model=view.model, runtime="llamacpp", node=self.node),
            "loaded": True,
            "healthy": True,
            "health_reason": "",
            "running": float(view.busy_slots),
            "waiting": view.deferred,
            "max_num_seqs": view.total_slots,
        }
        if view.kv_cache_usage is not None:  # only with --metrics
            changes[view.model]["kv_cache_usage"] = view.kv_cache_usage
        return self._update(changes, now)

    def _update(
        self, changes: Mapping[str, Mapping[str, Any]], now: float
    ) -> list[ModelStateDelta]:
        deltas = []
        for model, fields in sorted(changes.items()):
            old = self.states.get(model, ModelState(key=self._key(model)))
            new = attrs.evolve(old, last_updated=now, version=self.version, **fields)
            delta = old.delta_to(new)
            if delta.changes:
                self.states[model] = new
                deltas.append(delta)
        return deltas

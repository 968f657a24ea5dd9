"""Turn what a vLLM server reports (/metrics, /v1/models, /health) into ModelState values.

Sans-I/O and clock-free: the caller passes page text, JSON, the /health status and `now`, and
keeps the returned snapshot for the next call (rates and latencies come from the difference).
Never raises anything but `VllmPageError` for bad input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from infermesh.core.model import Labels, ModelState, TargetKey, finite_or_none
from infermesh.core.prometheus import Histogram
from infermesh.vllm.metrics import MetricsReading, ServedModelReading, VllmPageError, read_metrics

__all__ = [
    "MetricsReading",
    "ModelCard",
    "ParsedScrape",
    "VllmPageError",
    "build_states",
    "health_from_status",
    "parse_scrape",
    "read_metrics",
    "read_models",
]


@attrs.frozen
class ModelCard:
    """One entry of /v1/models: a base model (`parent` None) or a LoRA adapter of `parent`."""

    id: str
    parent: str | None = None
    root: str = ""


@attrs.frozen
class ParsedScrape:
    """States per served target, and the reading to pass as `previous` next time."""

    states: Mapping[TargetKey, ModelState]
    snapshot: MetricsReading


# --------------------------------------------------------------------------- /v1/models, /health


def read_models(payload: str | bytes) -> tuple[ModelCard, ...]:
    """Read a /v1/models body. Raises VllmPageError if it is not an OpenAI model list."""
    try:
        document: Any = json.loads(payload)
    except ValueError as exc:
        raise VllmPageError(f"not JSON ({exc})", "/v1/models") from None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        raise VllmPageError('not an OpenAI model list {"data": [...]}', "/v1/models")
    cards = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str) or not entry["id"]:
            raise VllmPageError(f"model entry {index} has no string 'id'", "/v1/models")
        parent = entry.get("parent")
        root = entry.get("root")
        cards.append(
            ModelCard(
                id=entry["id"],
                parent=parent if isinstance(parent, str) and parent else None,
                root=root if isinstance(root, str) else "",
            )
        )
    return tuple(cards)


def health_from_status(status: int) -> tuple[bool, str]:
    """(healthy, reason) from the /health status code."""
    if status == 200:
        return True, ""
    if status == 503:
        return False, "vLLM /health returned 503: the engine is dead; restart the vLLM server"
    return False, f"vLLM /health returned HTTP {status}; check the vLLM server's log"


# --------------------------------------------------------------------------- states


def build_states(
    *,
    node: str,
    endpoint: str,
    reading: MetricsReading,
    previous: MetricsReading | None,
    cards: Sequence[ModelCard],
    health_status: int,
    now: float,
) -> dict[TargetKey, ModelState]:
    """One ModelState per card of /v1/models; LoRA adapters carry their base model's load."""
    healthy, reason = health_from_status(health_status)
    if healthy and reading.asleep:
        healthy, reason = False, "vLLM engine is sleeping; POST /wake_up to serve again"
    adapters_of: dict[str, list[str]] = {}
    for card in cards:
        if card.parent is not None:
            adapters_of.setdefault(card.parent, []).append(card.id)
    base_states: dict[str, ModelState] = {}
    for card in cards:
        if card.parent is None:
            key = TargetKey(model=card.id, node=node, endpoint=endpoint)
            base_states[card.id] = attrs.evolve(
                _state(key, reading, previous, card.id, now, healthy, reason),
                adapters=tuple(sorted(adapters_of.get(card.id, ()))),
                labels=_labels(card, node, max_lora=reading.max_lora),
            )
    states = {state.key: state for state in base_states.values()}
    for card in cards:
        if card.parent is None:
            continue
        key = TargetKey(model=card.id, node=node, endpoint=endpoint)
        base = base_states.get(card.parent)
        if base is None:  # an adapter whose base is not listed: use the whole server's load
            base = _state(key, reading, previous, card.parent, now, healthy, reason)
        states[key] = attrs.evolve(
            base,
            key=key,
            adapters=(),
            labels=_labels(card, node, lora_state=_lora_state(card.id, reading)),
        )
    return states


def _lora_state(adapter: str, reading: MetricsReading) -> str:
    if reading.max_lora is None:  # no vllm:lora_requests_info on the page
        return ""
    if adapter in reading.running_adapters:
        return "running"
    if adapter in reading.waiting_adapters:
        return "waiting"
    return "idle"


def _labels(
    card: ModelCard, node: str, *, max_lora: int | None = None, lora_state: str = ""
) -> Labels:
    custom: dict[str, str] = {}
    if card.parent is not None:
        custom["lora_parent"] = card.parent
    if lora_state:
        custom["lora_state"] = lora_state
    if max_lora is not None:
        custom["max_lora"] = str(max_lora)
    return Labels(model=card.id, runtime="vllm", node=node, custom=custom)


def _state(
    key: TargetKey,
    reading: MetricsReading,
    previous: MetricsReading | None,
    model_name: str,
    now: float,
    healthy: bool,
    reason: str,
) -> ModelState:
    current = _reading_for(reading, model_name)
    before = _reading_for(previous, model_name) if previous is not None else None
    elapsed_s = reading.taken_at - previous.taken_at if previous is not None else 0.0
    return ModelState(
        key=key,
        running=current.running,
        waiting=current.waiting,
        kv_cache_usage=current.kv_cache_usage,
        prefix_cache_hit_rate=_hit_rate(current, before),
        ttft_s=_windowed_mean(current.ttft, before.ttft if before else None),
        itl_s=_windowed_mean(current.itl, before.itl if before else None),
        e2e_s=_windowed_mean(current.e2e, before.e2e if before else None),
        prompt_tokens_per_s=_rate(
            current.prompt_tokens, before.prompt_tokens if before else None, elapsed_s
        ),
        generation_tokens_per_s=_rate(
            current.generation_tokens, before.generation_tokens if before else None, elapsed_s
        ),
        max_num_seqs=reading.max_num_seqs,
        healthy=healthy,
        health_reason=reason,
        last_updated=now,
    )


def _reading_for(reading: MetricsReading, model_name: str) -> ServedModelReading:
    found = reading.served.get(model_name)
    if found is not None:
        return found
    # An alias from --served-model-name: the engines label their series with the first name,
    # and every name is served by the same engines.
    merged = ServedModelReading()
    for other in reading.served.values():
        merged = merged.merge(other)
    return merged


def _increase(current: float, before: float) -> float:
    # A counter that went down means the runtime restarted: everything counted is new.
    return current - before if current >= before else current


def _rate(current: float, before: float | None, elapsed_s: float) -> float:
    if before is None or elapsed_s <= 0:
        return 0.0
    return _increase(current, before) / elapsed_s


def _hit_rate(current: ServedModelReading, before: ServedModelReading | None) -> float | None:
    hits, queries = current.prefix_hits, current.prefix_queries
    if hits is None or queries is None:
        return None
    if before is not None and before.prefix_hits is not None and before.prefix_queries is not None:
        new_queries = _increase(queries, before.prefix_queries)
        if new_queries > 0 and queries >= before.prefix_queries:
            return min(1.0, max(0.0, (hits - before.prefix_hits) / new_queries))
    return min(1.0, max(0.0, hits / queries)) if queries > 0 else None


def _windowed_mean(current: Histogram | None, before: Histogram | None) -> float | None:
    """Mean of the observations since `before`; the cumulative mean if there were none."""
    if current is None:
        return None
    if before is not None and current.count > before.count:
        return finite_or_none((current - before).mean)
    return finite_or_none(current.mean)


# --------------------------------------------------------------------------- one call


def parse_scrape(
    *,
    metrics_text: str,
    models_json: str | bytes,
    health_status: int,
    previous: MetricsReading | None,
    now: float,
    node: str,
    endpoint: str,
) -> ParsedScrape:
    """States of every model the server lists, and the snapshot for the next call."""
    reading = read_metrics(metrics_text, now)
    cards = read_models(models_json)
    states = build_states(
        node=node,
        endpoint=endpoint,
        reading=reading,
        previous=previous,
        cards=cards,
        health_status=health_status,
        now=now,
    )
    return ParsedScrape(states=states, snapshot=reading)

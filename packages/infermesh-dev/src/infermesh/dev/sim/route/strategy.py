"""What a routing strategy sees and must do in the routing simulator.

A strategy gets each arriving `SimRequest` and the fleet as `ReplicaView`s and names the replica
that serves it (or None to reject it). Views are owned by the simulator and updated in place when
(delayed) telemetry arrives or the router's own in-flight count changes, so passing the fleet is
O(1); strategies read them and never write them. `observe` is called on every telemetry delivery
so a strategy can keep its own index incrementally instead of scanning the fleet per decision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

import attrs

from infermesh.dev.kv_cache import hash_prompt_blocks

__all__ = [
    "BLOCK_SIZE",
    "SLO_TARGETS",
    "VOCAB_SIZE",
    "ReplicaView",
    "SimRequest",
    "SloTarget",
    "Strategy",
    "block_hashes",
    "prompt_token_ids",
]

BLOCK_SIZE = 16
"""KV block size (tokens) of every profile; the unit of prefix-cache hits."""

VOCAB_SIZE = 128_256
"""Token ids are drawn below this (a Llama-3-sized vocabulary)."""


@attrs.frozen
class SloTarget:
    """What a request of one SLO class must meet to count towards goodput."""

    ttft_s: float
    e2e_s_per_output_token: float
    """e2e budget per output token, on top of `ttft_s`."""


SLO_TARGETS: dict[str, SloTarget] = {
    "latency": SloTarget(ttft_s=0.5, e2e_s_per_output_token=0.05),
    "standard": SloTarget(ttft_s=2.0, e2e_s_per_output_token=0.1),
    "batch": SloTarget(ttft_s=30.0, e2e_s_per_output_token=0.5),
}
"""SLO classes (the names of `infermesh.core.model.SloClass`) and their targets."""


@attrs.frozen
class SimRequest:
    """One request of a workload: when it arrives and what it asks for.

    The prompt is `prefix_tokens` tokens shared by every request of `prefix_group` (a tenant's
    system prompt, a session's history) followed by `prompt_tokens - prefix_tokens` tokens of its
    own; `prompt_token_ids` builds them deterministically from the names.
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: str = ""
    prefix_tokens: int = 0
    slo_class: str = "standard"
    tenant: str = ""
    session: str = ""

    def __attrs_post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"request {self.request_id}: prompt and output need >= 1 token")
        if not 0 <= self.prefix_tokens <= self.prompt_tokens:
            raise ValueError(f"request {self.request_id}: prefix_tokens not in [0, prompt]")
        if self.prefix_tokens and not self.prefix_group:
            raise ValueError(f"request {self.request_id}: prefix_tokens without prefix_group")
        if self.slo_class not in SLO_TARGETS:
            raise ValueError(f"request {self.request_id}: unknown SLO class {self.slo_class!r}")

    @property
    def slo(self) -> SloTarget:
        return SLO_TARGETS[self.slo_class]


def _seed_tokens(name: str) -> list[int]:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return [int.from_bytes(digest[i : i + 2], "big") for i in range(0, 8, 2)]


def _tokens(name: str, count: int) -> list[int]:
    """`count` token ids named by `name`: 4 ids from its hash, then an arithmetic run."""
    head = _seed_tokens(name)
    start = head[0] * 65_536 + head[1]
    run = [(start + i * 40_503) % VOCAB_SIZE for i in range(max(count - len(head), 0))]
    return (head + run)[:count]


def prompt_token_ids(request: SimRequest) -> list[int]:
    """The request's prompt: its group's shared prefix, then tokens of its own."""
    prefix = _tokens("g:" + request.prefix_group, request.prefix_tokens)
    return prefix + _tokens("r:" + request.request_id, request.prompt_tokens - len(prefix))


def block_hashes(request: SimRequest, block_size: int = BLOCK_SIZE) -> list[int]:
    """The chained hashes of the prompt's full blocks, as the engine's prefix cache keys them."""
    return hash_prompt_blocks(prompt_token_ids(request), block_size)


@attrs.define(eq=False)
class ReplicaView:
    """One replica as a router sees it. Read-only for strategies; the simulator updates it.

    The telemetry fields are the last scrape that reached the router (`telemetry_s` is when it
    was taken, so `now - telemetry_s` is its age); `in_flight` is the router's own count of
    requests it sent there that have not finished, always current.
    """

    replica_id: str
    index: int
    node: str
    profile: str
    rtt_s: float
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    telemetry_s: float = 0.0
    in_flight: int = 0
    max_num_seqs: int = 0
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    """Means over the last scrape window (as vLLM's histograms give them); None before any."""
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0

    def age_s(self, now: float) -> float:
        return now - self.telemetry_s


class Strategy(Protocol):
    """A routing algorithm under test; one instance routes one whole run."""

    name: str

    def choose(
        self, request: SimRequest, replicas: Sequence[ReplicaView], now: float
    ) -> str | None:
        """The replica id to send `request` to, or None to reject it."""
        ...

    def observe(self, replica: ReplicaView, now: float) -> None:
        """`replica`'s telemetry fields were just updated (a scrape arrived)."""
        ...

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        """`request` finished on `replica_id` (ok=False: it failed or was aborted)."""
        ...

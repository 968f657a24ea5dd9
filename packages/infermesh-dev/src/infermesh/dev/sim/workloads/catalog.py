"""The named workloads of `infermesh sim route`: request shapes over an arrival process.

Each workload is a function of a `random.Random`, a duration and a mean rate that yields
`SimRequest`s in arrival order; the same seed gives the same requests. Nothing here reads a
clock, a file or global randomness.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator

import attrs

from infermesh.dev.sim.route.strategy import SimRequest
from infermesh.dev.sim.workloads.arrivals import mmpp_arrivals, poisson_arrivals

__all__ = ["MAX_CONTEXT_TOKENS", "WORKLOADS", "Workload", "generate"]

MAX_CONTEXT_TOKENS = 8192
"""Prompt + output never exceed this: the engine profiles' `max_model_len`."""

Workload = Callable[[random.Random, float, float], Iterator[SimRequest]]
"""(rng, duration_s, rate) -> requests in arrival order, with placeholder request ids."""


def _output_tokens(rng: random.Random, median: float, low: int, high: int) -> int:
    """A log-normal answer length (sigma 0.6, like chat answers), clamped to [low, high]."""
    return min(high, max(low, round(rng.lognormvariate(math.log(median), 0.6))))


def short_prompts(rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """Uniform short prompts (32-256 tokens, 16-128 out), no shared prefix, Poisson arrivals."""
    for arrival_s in poisson_arrivals(rng, rate, duration_s):
        yield SimRequest(
            request_id="",
            arrival_s=arrival_s,
            prompt_tokens=rng.randint(32, 256),
            output_tokens=rng.randint(16, 128),
            slo_class="latency",
        )


@attrs.frozen
class _Tenant:
    name: str
    system_prompt_tokens: int
    slo_class: str


def _tenants(rng: random.Random, count: int) -> list[_Tenant]:
    # Every fourth tenant is interactive ("latency"); system prompts are 1-4k tokens.
    return [
        _Tenant(f"tenant-{i}", rng.randint(1024, 4096), "latency" if i % 4 == 0 else "standard")
        for i in range(count)
    ]


def _chat(
    rng: random.Random, arrivals: Iterator[float], num_tenants: int = 16
) -> Iterator[SimRequest]:
    tenants = _tenants(rng, num_tenants)
    # Zipf(1) popularity: a few tenants carry most of the traffic, as in multi-tenant SaaS.
    weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(num_tenants)))
    for arrival_s in arrivals:
        tenant = rng.choices(tenants, cum_weights=weights)[0]
        question = rng.randint(32, 512)
        yield SimRequest(
            request_id="",
            arrival_s=arrival_s,
            prompt_tokens=tenant.system_prompt_tokens + question,
            output_tokens=_output_tokens(rng, 150.0, 8, 1024),
            prefix_group=tenant.name,
            prefix_tokens=tenant.system_prompt_tokens,
            slo_class=tenant.slo_class,
            tenant=tenant.name,
        )


def shared_prefix_chat(rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """Multi-tenant chat: 16 tenants (Zipf popularity) with 1-4k-token system prompts, Poisson."""
    return _chat(rng, poisson_arrivals(rng, rate, duration_s))


def bursty_chat(rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """The shared-prefix chat shapes under MMPP arrivals: 2 s bursts at 4x every ~10 s."""
    return _chat(rng, mmpp_arrivals(rng, rate, duration_s))


_Turn = tuple[float, int, str, int, int]
"""A pending session turn: (arrival_s, tie-break order, session, history_tokens, turns_left);
history_tokens counts the earlier prompts and answers that this turn's prompt repeats."""


def multi_turn_sessions(
    rng: random.Random,
    duration_s: float,
    rate: float,
    *,
    mean_turns: float = 4.0,
    mean_think_s: float = 8.0,
) -> Iterator[SimRequest]:
    """Multi-turn chat sessions: each turn re-sends the whole conversation so far.

    Sessions start as a Poisson process at `rate / mean_turns` (from well before 0, so the run
    opens in the steady state) and turns arrive at about `rate`; a session has a geometric number
    of turns and exponential think times. A turn's prompt is the session's history plus a new
    user message; all of it except the last token is the session's `prefix_group` content, so
    the next turn finds this turn's prompt in a replica's prefix cache, as vLLM does for a real
    conversation. Sessions end before the
    context would exceed `MAX_CONTEXT_TOKENS`.
    """
    # Sessions start from well before 0 and turns before 0 are dropped, so the run opens with
    # conversations already under way and the turn rate is `rate` from the first second.
    warmup_s = 4.0 * mean_turns * mean_think_s
    starts = (
        start_s - warmup_s
        for start_s in poisson_arrivals(rng, rate / mean_turns, duration_s + warmup_s)
    )
    pending: list[_Turn] = []
    counter = itertools.count()
    next_start = next(starts, math.inf)
    while True:
        if next_start <= (pending[0][0] if pending else math.inf):
            if next_start == math.inf:
                return
            # Geometric number of turns with mean `mean_turns` (at least one).
            turns = 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean_turns))
            session = f"s{next(counter)}"
            heapq.heappush(pending, (next_start, next(counter), session, 0, turns))
            next_start = next(starts, math.inf)
            continue
        arrival_s, _, session, history_tokens, turns_left = heapq.heappop(pending)
        if arrival_s >= duration_s:
            continue
        prompt = history_tokens + rng.randint(32, 384)
        output = _output_tokens(rng, 200.0, 16, 768)
        if prompt + output > MAX_CONTEXT_TOKENS:
            continue
        if arrival_s >= 0.0:  # earlier turns only build the history
            yield SimRequest(
                request_id="",
                arrival_s=arrival_s,
                prompt_tokens=prompt,
                output_tokens=output,
                prefix_group=session,
                prefix_tokens=prompt - 1,
                slo_class="latency",
                session=session,
            )
        if turns_left > 1:
            next_turn_s = arrival_s + rng.expovariate(1.0 / mean_think_s)
            turn = (next_turn_s, next(counter), session, prompt + output, turns_left - 1)
            heapq.heappush(pending, turn)


def long_context_mix(rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """70% medium prompts (512-2048 tokens), 30% long questions over 8 shared documents (4-7k).

    The long requests are "batch" (document analysis); they occupy prefill for a long time and
    hold many KV blocks, which is what a router must keep away from interactive traffic.
    """
    documents = [rng.randint(4000, 7000) for _ in range(8)]
    for arrival_s in poisson_arrivals(rng, rate, duration_s):
        if rng.random() < 0.7:
            yield SimRequest(
                request_id="",
                arrival_s=arrival_s,
                prompt_tokens=rng.randint(512, 2048),
                output_tokens=_output_tokens(rng, 150.0, 16, 512),
                slo_class="standard",
            )
            continue
        document = rng.randrange(len(documents))
        yield SimRequest(
            request_id="",
            arrival_s=arrival_s,
            prompt_tokens=documents[document] + rng.randint(64, 256),
            output_tokens=_output_tokens(rng, 200.0, 32, 640),
            prefix_group=f"doc-{document}",
            prefix_tokens=documents[document],
            slo_class="batch",
        )


_MIXED_SHARES: tuple[tuple[Workload, float], ...] = (
    (bursty_chat, 0.5),
    (multi_turn_sessions, 0.2),
    (short_prompts, 0.2),
    (long_context_mix, 0.1),
)


def mixed(rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """The issue's mixed workload: shared-prefix chat in bursts (50% of the rate), multi-turn
    sessions (20%), uniform short prompts (20%) and the long-context mix (10%), merged in time.

    Each part draws from its own generator seeded from `rng`, so the parts are independent and
    the whole is reproducible from one seed.
    """
    parts = [
        workload(random.Random(rng.getrandbits(64)), duration_s, rate * share)
        for workload, share in _MIXED_SHARES
    ]
    return heapq.merge(*parts, key=lambda request: request.arrival_s)


WORKLOADS: dict[str, Workload] = {
    "short": short_prompts,
    "chat": shared_prefix_chat,
    "bursty": bursty_chat,
    "sessions": multi_turn_sessions,
    "long_context": long_context_mix,
    "mixed": mixed,
}
"""Workload names accepted by `generate` and `infermesh sim route --workload`."""


def generate(name: str, rng: random.Random, duration_s: float, rate: float) -> Iterator[SimRequest]:
    """The requests of workload `name` arriving in [0, duration_s) at `rate` per second on average.

    Request ids are `w<index>` in arrival order. Raises ValueError naming the known workloads for
    an unknown name.
    """
    try:
        workload = WORKLOADS[name]
    except KeyError:
        known = ", ".join(sorted(WORKLOADS))
        raise ValueError(f"unknown workload {name!r}; choose one of: {known}") from None
    requests = workload(rng, duration_s, rate)
    return (attrs.evolve(request, request_id=f"w{index}") for index, request in enumerate(requests))

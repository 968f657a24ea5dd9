"""Engine performance model of one vLLM replica: continuous batching over a KV-block pool.

Sans-I/O and clock-injected: `submit(request, now)`, `step(now) -> StepResult` whose outputs are
due at `result.end_s`, `abort(request_id, now)`. The same object runs under the emulator's
real-time loop and under `simulate()` with virtual time. It never sleeps or reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Sequence

import attrs

from infermesh.dev.kv_cache import BlockPool, hash_prompt_blocks
from infermesh.dev.profiles import GpuProfile

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineRequest",
    "EngineSnapshot",
    "FinishedStats",
    "RequestTiming",
    "Simulation",
    "StepResult",
    "StepStats",
    "TokenOutput",
    "simulate",
]


@attrs.frozen
class EngineConfig:
    """Scheduler limits and speeds; `from_profile` fills them from a GPU profile."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_gpu_blocks: int
    block_size: int
    max_model_len: int
    prefill_tokens_per_s: float
    step_base_s: float
    step_per_seq_s: float
    enable_prefix_caching: bool = True
    step_per_kv_token_s: float = 0.0
    """Attention's read of the KV cache: seconds per cached token of each decoding sequence."""
    prefill_per_token_pair_s: float = 0.0
    """Prefill attention: seconds per (new token, context token) pair, so long prompts cost
    more than linearly."""

    def __attrs_post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError(
                f"prefill_tokens_per_s must be positive, got {self.prefill_tokens_per_s}"
            )
        for name in ("step_base_s", "step_per_seq_s", "step_per_kv_token_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.prefill_per_token_pair_s < 0:
            raise ValueError(
                f"prefill_per_token_pair_s must be >= 0, got {self.prefill_per_token_pair_s}"
            )
        if self.num_gpu_blocks * self.block_size < self.max_model_len:
            raise ValueError(
                f"{self.num_gpu_blocks} KV blocks of {self.block_size} tokens cannot hold one "
                f"sequence of max_model_len={self.max_model_len}; add blocks or lower the length"
            )

    @classmethod
    def from_profile(
        cls,
        profile: GpuProfile,
        *,
        max_num_seqs: int | None = None,
        num_gpu_blocks: int | None = None,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
    ) -> EngineConfig:
        return cls(
            max_num_seqs=max_num_seqs or profile.max_num_seqs,
            max_num_batched_tokens=profile.max_num_batched_tokens,
            num_gpu_blocks=num_gpu_blocks or profile.num_gpu_blocks,
            block_size=profile.block_size,
            max_model_len=max_model_len or profile.max_model_len,
            prefill_tokens_per_s=profile.prefill_tokens_per_s,
            step_base_s=profile.step_base_s,
            step_per_seq_s=profile.step_per_seq_s,
            enable_prefix_caching=enable_prefix_caching,
            step_per_kv_token_s=profile.step_per_kv_token_s,
            prefill_per_token_pair_s=profile.prefill_per_token_pair_s,
        )

    def step_s(
        self,
        num_seqs: int,
        prefill_tokens: int,
        kv_tokens: int = 0,
        prefill_pairs: float = 0.0,
    ) -> float:
        """A step's duration: a per-step cost (reading the weights), a per-sequence cost, the
        KV-cache read of the decoding sequences (`kv_tokens` cached tokens), and prompt compute
        (`prefill_tokens` new tokens attending over `prefill_pairs` token pairs)."""
        return (
            self.step_base_s
            + self.step_per_seq_s * num_seqs
            + self.step_per_kv_token_s * kv_tokens
            + prefill_tokens / self.prefill_tokens_per_s
            + self.prefill_per_token_pair_s * prefill_pairs
        )


@attrs.frozen
class EngineRequest:
    """One generation request as the engine sees it.

    The request produces exactly `max_tokens` tokens and then finishes with `finish_reason`
    ("length" when the client set the limit, "stop" to model an end-of-sequence token).
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    max_tokens: int
    finish_reason: str = "length"

    def __attrs_post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        if self.max_tokens < 1:
            raise ValueError(f"request {self.request_id}: max_tokens must be >= 1")


@attrs.frozen
class TokenOutput:
    """What one request got from one step: one more token, and whether it is finished."""

    request_id: str
    num_output_tokens: int
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int


@attrs.frozen
class FinishedStats:
    """Per-request figures recorded when a request finishes (vLLM's finished-request stats)."""

    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    max_tokens: int
    e2e_s: float
    queue_s: float
    prefill_s: float
    decode_s: float
    inference_s: float
    num_preemptions: int
    prefill_computed_tokens: int
    request_id: str = ""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was first admitted."""


@attrs.frozen
class StepStats:
    """What happened in one step, in the units vLLM's metrics use."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    scheduled_tokens: int = 0
    ttfts_s: tuple[float, ...] = ()
    itls_s: tuple[float, ...] = ()
    finished: tuple[FinishedStats, ...] = ()
    preemptions: int = 0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0


@attrs.frozen
class StepResult:
    """One engine step: it started at `start_s`; its outputs exist from `end_s` on."""

    start_s: float
    end_s: float
    outputs: tuple[TokenOutput, ...]
    stats: StepStats

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@attrs.frozen
class EngineSnapshot:
    """The engine's gauges right now."""

    running: int
    waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_cached_blocks: int


class _Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"


@attrs.define
class _Sequence:
    request: EngineRequest
    arrival_s: float
    block_hashes: list[int]
    status: _Status = _Status.WAITING
    blocks: list[int] = attrs.field(factory=list)
    num_computed_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    num_registered_blocks: int = 0
    num_preemptions: int = 0
    prefill_computed_tokens: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    queried_prefix_cache: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: what must be in the KV cache to sample the next one."""
        return self.prompt_len + self.num_output_tokens

    @property
    def in_prefill(self) -> bool:
        """True until the KV cache holds all but the last sampled token (first run or recompute)."""
        return self.num_output_tokens == 0 or self.num_computed_tokens < self.num_tokens - 1


class Engine:
    """Continuous batching over a block pool with a prefix cache, driven by `step(now)`.

    Each step first advances running sequences (one decode token each, or their next prefill
    chunk) within `max_num_batched_tokens`, preempting the most recently admitted sequence
    (recompute mode) when the pool runs out of blocks; then admits waiting requests in arrival
    order while there is room in the batch, the token budget and the pool.
    """

    def __init__(self, config: EngineConfig, *, speed_factor: float = 1.0) -> None:
        self.config = config
        self._speed_factor = 1.0
        self.speed_factor = speed_factor
        self.pool = BlockPool(
            config.num_gpu_blocks, enable_prefix_caching=config.enable_prefix_caching
        )
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._by_id: dict[str, _Sequence] = {}

    @property
    def speed_factor(self) -> float:
        """Fraction of the profile's speed (0 < f <= 1): every step lasts 1/f as long, as on a
        throttled or degraded GPU. Settable at run time (the emulator's dev-only
        `POST /dev/speed`, the simulator's degraded replicas); applies from the next step."""
        return self._speed_factor

    @speed_factor.setter
    def speed_factor(self, factor: float) -> None:
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"speed_factor must be in (0, 1], got {factor}")
        self._speed_factor = float(factor)

    # ------------------------------------------------------------------ inputs

    def submit(self, request: EngineRequest, now: float) -> None:
        """Queue `request`, arrived at `now`. Raises ValueError if it can never fit."""
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        total = len(request.prompt_token_ids) + request.max_tokens
        if total > self.config.max_model_len:
            raise ValueError(
                f"request {request.request_id}: {len(request.prompt_token_ids)} prompt tokens"
                f" + {request.max_tokens} output tokens exceed"
                f" max_model_len={self.config.max_model_len}"
            )
        block_hashes = (
            hash_prompt_blocks(request.prompt_token_ids, self.config.block_size)
            if self.config.enable_prefix_caching
            else []
        )
        seq = _Sequence(request=request, arrival_s=now, block_hashes=block_hashes)
        self._by_id[request.request_id] = seq
        self._waiting.append(seq)

    def abort(self, request_id: str, now: float) -> FinishedStats | None:
        """Drop a request (client went away); its blocks are freed. None if it is unknown."""
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return None
        if seq.status is _Status.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks = []
        return self._finished_stats(seq, "abort", now)

    # ------------------------------------------------------------------ state

    def has_unfinished(self) -> bool:
        return bool(self._by_id)

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            running=len(self._running),
            waiting=len(self._waiting),
            kv_cache_usage=self.pool.usage,
            num_free_blocks=self.pool.num_free_blocks,
            num_cached_blocks=self.pool.num_cached_blocks,
        )

    # ------------------------------------------------------------------ the step

    def step(self, now: float) -> StepResult:
        """Schedule and run one step starting at `now`; outputs are due at `result.end_s`.

        A step with nothing to schedule (idle engine) has zero duration and no outputs.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[_Sequence, int]] = []
        preemptions = 0
        prefix_queries = prefix_hits = 0

        # 1. Running sequences, oldest first; preempt from the back when blocks run out.
        index = 0
        while index < len(self._running) and budget > 0:
            seq = self._running[index]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self._grow(seq, num_new):
                victim = self._running[-1]
                self._preempt(victim)
                preemptions += 1
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
                budget -= num_new
                index += 1

        # 2. Waiting requests, in order, unless this step had to preempt.
        while (
            not preemptions
            and self._waiting
            and budget > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            seq = self._waiting[0]
            admitted = self._admit(seq, budget, now)
            if admitted is None:
                break
            num_new, queried, hits = admitted
            prefix_queries += queried
            prefix_hits += hits
            self._waiting.popleft()
            seq.status = _Status.RUNNING
            self._running.append(seq)
            scheduled.append((seq, num_new))
            budget -= num_new

        if not scheduled:
            return StepResult(
                start_s=now,
                end_s=now,
                outputs=(),
                stats=StepStats(
                    preemptions=preemptions,
                    prefix_queries_tokens=prefix_queries,
                    prefix_hits_tokens=prefix_hits,
                ),
            )

        prefill_tokens = kv_tokens = 0
        prefill_pairs = 0.0
        for seq, num_new in scheduled:
            if seq.in_prefill:
                prefill_tokens += num_new
                # Each new token attends to the cached context and to the new tokens before it.
                prefill_pairs += num_new * (seq.num_computed_tokens + (num_new + 1) / 2)
            else:
                kv_tokens += seq.num_computed_tokens
        duration = self.config.step_s(len(scheduled), prefill_tokens, kv_tokens, prefill_pairs)
        end_s = now + duration / self._speed_factor
        return self._finish_step(now, end_s, scheduled, preemptions, prefix_queries, prefix_hits)

    def _finish_step(
        self,
        now: float,
        end_s: float,
        scheduled: list[tuple[_Sequence, int]],
        preemptions: int,
        prefix_queries: int,
        prefix_hits: int,
    ) -> StepResult:
        outputs: list[TokenOutput] = []
        ttfts: list[float] = []
        itls: list[float] = []
        finished: list[FinishedStats] = []
        prompt_tokens = generation_tokens = 0
        for seq, num_new in scheduled:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
            if seq.in_prefill:
                seq.prefill_computed_tokens += num_new
            seq.num_computed_tokens += num_new
            self._register_full_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prefill chunk; no token yet
            seq.num_output_tokens += 1
            generation_tokens += 1
            if seq.first_token_s is None:
                seq.first_token_s = end_s
                ttfts.append(end_s - seq.arrival_s)
                prompt_tokens += seq.prompt_len
            else:
                itls.append(end_s - (seq.last_token_s or end_s))
            seq.last_token_s = end_s
            done = seq.num_output_tokens >= seq.request.max_tokens
            reason = seq.request.finish_reason if done else None
            outputs.append(
                TokenOutput(
                    request_id=seq.request.request_id,
                    num_output_tokens=seq.num_output_tokens,
                    finished=done,
                    finish_reason=reason,
                    prompt_tokens=seq.prompt_len,
                    cached_tokens=seq.num_cached_tokens,
                )
            )
            if done:
                self._running.remove(seq)
                del self._by_id[seq.request.request_id]
                self.pool.free(seq.blocks)
                seq.blocks = []
                finished.append(self._finished_stats(seq, seq.request.finish_reason, end_s))
        return StepResult(
            start_s=now,
            end_s=end_s,
            outputs=tuple(outputs),
            stats=StepStats(
                prompt_tokens=prompt_tokens,
                generation_tokens=generation_tokens,
                scheduled_tokens=sum(num_new for _, num_new in scheduled),
                ttfts_s=tuple(ttfts),
                itls_s=tuple(itls),
                finished=tuple(finished),
                preemptions=preemptions,
                prefix_queries_tokens=prefix_queries,
                prefix_hits_tokens=prefix_hits,
            ),
        )

    # ------------------------------------------------------------------ helpers

    def _blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.config.block_size)

    def _grow(self, seq: _Sequence, num_new: int) -> bool:
        """Give `seq` the blocks for `num_new` more tokens; False when the pool is short."""
        missing = self._blocks_needed(seq.num_computed_tokens + num_new) - len(seq.blocks)
        if missing <= 0:
            return True
        blocks = self.pool.allocate(missing)
        if blocks is None:
            return False
        seq.blocks.extend(blocks)
        return True

    def _preempt(self, seq: _Sequence) -> None:
        """Recompute-mode preemption: free everything, back to the head of the queue."""
        self._running.remove(seq)
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        seq.status = _Status.WAITING
        self._waiting.appendleft(seq)

    def _admit(self, seq: _Sequence, budget: int, now: float) -> tuple[int, int, int] | None:
        """Blocks for `seq`'s first chunk, reusing cached prefix blocks.

        Returns (tokens scheduled, prefix-cache tokens queried, tokens hit) or None when the pool
        cannot hold the chunk. At least one token is always computed, so a fully cached prompt
        still recomputes its last block.
        """
        block_size = self.config.block_size
        cached_blocks = self.pool.lookup(seq.block_hashes)
        max_cached_blocks = (seq.num_tokens - 1) // block_size
        cached_blocks = cached_blocks[:max_cached_blocks]
        num_cached = len(cached_blocks) * block_size
        num_new = min(seq.num_tokens - num_cached, budget)
        missing = self._blocks_needed(num_cached + num_new) - len(cached_blocks)
        available = self.pool.num_free_blocks - self.pool.num_free_among(cached_blocks)
        if missing > available:
            return None
        self.pool.touch(cached_blocks)
        fresh = self.pool.allocate(missing) or []
        seq.blocks = [*cached_blocks, *fresh]
        seq.num_computed_tokens = num_cached
        seq.num_registered_blocks = len(cached_blocks)
        queried = hits = 0
        if not seq.queried_prefix_cache:
            # Counted on first admission only, like vLLM's per-request prefix-cache stats.
            seq.queried_prefix_cache = True
            seq.num_cached_tokens = num_cached
            queried, hits = seq.prompt_len, num_cached
        return num_new, queried, hits

    def _register_full_blocks(self, seq: _Sequence) -> None:
        """Make newly completed prompt blocks findable by later requests."""
        full = min(seq.num_computed_tokens // self.config.block_size, len(seq.block_hashes))
        for block_index in range(seq.num_registered_blocks, full):
            self.pool.register(seq.blocks[block_index], seq.block_hashes[block_index])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _finished_stats(self, seq: _Sequence, reason: str, now: float) -> FinishedStats:
        scheduled_s = seq.first_scheduled_s if seq.first_scheduled_s is not None else now
        first_token_s = seq.first_token_s if seq.first_token_s is not None else now
        return FinishedStats(
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            generation_tokens=seq.num_output_tokens,
            max_tokens=seq.request.max_tokens,
            e2e_s=now - seq.arrival_s,
            queue_s=scheduled_s - seq.arrival_s,
            prefill_s=first_token_s - scheduled_s,
            decode_s=now - first_token_s,
            inference_s=now - scheduled_s,
            num_preemptions=seq.num_preemptions,
            prefill_computed_tokens=seq.prefill_computed_tokens,
            request_id=seq.request.request_id,
            cached_tokens=seq.num_cached_tokens,
        )


# ---------------------------------------------------------------------- virtual-time driver


@attrs.frozen
class RequestTiming:
    """When one simulated request arrived, got its first token and finished."""

    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    output_tokens: int
    cached_tokens: int

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s


@attrs.frozen
class Simulation:
    steps: tuple[StepResult, ...]
    requests: dict[str, RequestTiming]

    @property
    def end_s(self) -> float:
        return self.steps[-1].end_s if self.steps else 0.0


def simulate(
    engine: Engine,
    arrivals: Iterable[tuple[float, EngineRequest]],
    *,
    max_steps: int = 1_000_000,
) -> Simulation:
    """Run `engine` in virtual time over `(arrival_s, request)` pairs until all finish."""
    pending = sorted(arrivals, key=lambda pair: pair[0])
    arrival_of = {request.request_id: at for at, request in pending}
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    tokens: dict[str, int] = {}
    cached: dict[str, int] = {}
    steps: list[StepResult] = []
    now = pending[0][0] if pending else 0.0
    next_arrival = 0
    while next_arrival < len(pending) or engine.has_unfinished():
        while next_arrival < len(pending) and pending[next_arrival][0] <= now:
            at, request = pending[next_arrival]
            engine.submit(request, at)
            next_arrival += 1
        result = engine.step(now)
        if not result.outputs and result.stats.scheduled_tokens == 0:
            if next_arrival >= len(pending):
                raise RuntimeError("engine has unfinished requests but cannot schedule any")
            now = max(now, pending[next_arrival][0])
            continue
        steps.append(result)
        if len(steps) > max_steps:
            raise RuntimeError(f"simulation did not finish within {max_steps} steps")
        for output in result.outputs:
            first.setdefault(output.request_id, result.end_s)
            tokens[output.request_id] = output.num_output_tokens
            cached[output.request_id] = output.cached_tokens
            if output.finished:
                finish[output.request_id] = result.end_s
        now = result.end_s
    timings = {
        request_id: RequestTiming(
            arrival_s=at,
            first_token_s=first.get(request_id),
            finish_s=finish.get(request_id),
            output_tokens=tokens.get(request_id, 0),
            cached_tokens=cached.get(request_id, 0),
        )
        for request_id, at in arrival_of.items()
    }
    return Simulation(steps=tuple(steps), requests=timings)

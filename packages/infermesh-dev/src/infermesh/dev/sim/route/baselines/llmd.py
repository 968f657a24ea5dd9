"""llm-d's inference scheduler: weighted scorers (queue 2, KV-cache utilisation 2, prefix 3),
a max-score picker, and the saturation detector that sheds sheddable requests.

Source: llm-d/llm-d-inference-scheduler's default `EndpointPickerConfig` ("well-lit path"
inference scheduling) and the Gateway API Inference Extension plugins it builds on
(kubernetes-sigs/gateway-api-inference-extension, `pkg/epp/scheduling/framework/plugins/` and
`pkg/epp/saturationdetector/`):

- queue-scorer: `(max_waiting - waiting) / (max_waiting - min_waiting)` over the candidates,
  1.0 for all when the queues are equal (`vllm:num_requests_waiting`, scraped);
- kv-cache-utilization-scorer: `1 - kv_usage` (`vllm:kv_cache_usage_perc`, scraped);
- prefix-cache-scorer (approximate): the share of the prompt's blocks (at most 256) that lead
  the prompts this scheduler sent to a pod, from a per-pod LRU of 31,250 block hashes;
- max-score picker: the highest weighted sum, ties drawn at random;
- saturation detector: a pod has capacity when its metrics are at most 200 ms old, its waiting
  queue is at most 5 and its KV usage at most 0.8; when no pod has capacity the pool is
  saturated and sheddable requests (SLO class "batch" here) are rejected.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Collection, Sequence

from infermesh.dev.sim.route.strategy import ReplicaView, SimRequest, block_hashes

__all__ = ["LlmdScorers", "PrefixIndex"]


class PrefixIndex:
    """The approximate prefix-cache scorer's memory: block hashes routed to each pod, LRU."""

    def __init__(self, num_pods: int, capacity_per_pod: int) -> None:
        self._capacity = capacity_per_pod
        self._holders: dict[int, set[int]] = {}
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_pods)]

    def matched_blocks(self, hashes: Sequence[int]) -> dict[int, int]:
        """Pod -> how many leading blocks of `hashes` it was sent (pods with none left out)."""
        matched: dict[int, int] = {}
        active: set[int] = set()
        for depth, block_hash in enumerate(hashes):
            holders = self._holders.get(block_hash, set())
            still = set(holders) if depth == 0 else active & holders
            for pod in active - still:
                matched[pod] = depth
            active = still
            if not active:
                return matched
        for pod in active:
            matched[pod] = len(hashes)
        return matched

    def add(self, hashes: Sequence[int], pod: int) -> None:
        lru = self._lru[pod]
        for block_hash in hashes:
            self._holders.setdefault(block_hash, set()).add(pod)
            lru[block_hash] = None
            lru.move_to_end(block_hash)
        while len(lru) > self._capacity:
            evicted, _ = lru.popitem(last=False)
            holders = self._holders[evicted]
            holders.discard(pod)
            if not holders:
                del self._holders[evicted]


class LlmdScorers:
    """llm-d's default scheduling profile and saturation rule (see the module docstring)."""

    name = "llmd"

    def __init__(
        self,
        rng: random.Random,
        *,
        queue_weight: float = 2.0,
        kv_cache_weight: float = 2.0,
        prefix_weight: float = 3.0,
        max_prefix_blocks: int = 256,
        lru_capacity_per_pod: int = 31_250,
        queue_depth_threshold: int = 5,
        kv_cache_util_threshold: float = 0.8,
        metrics_staleness_s: float = 0.2,
        sheddable_classes: Collection[str] = ("batch",),
    ) -> None:
        self._rng = rng
        self.queue_weight = queue_weight
        self.kv_cache_weight = kv_cache_weight
        self.prefix_weight = prefix_weight
        self.max_prefix_blocks = max_prefix_blocks
        self.lru_capacity_per_pod = lru_capacity_per_pod
        self.queue_depth_threshold = queue_depth_threshold
        self.kv_cache_util_threshold = kv_cache_util_threshold
        self.metrics_staleness_s = metrics_staleness_s
        self.sheddable_classes = frozenset(sheddable_classes)
        self._prefix = PrefixIndex(0, lru_capacity_per_pod)
        self._num_pods = 0

    def has_capacity(self, pod: ReplicaView, now: float) -> bool:
        """The saturation detector's test of one pod."""
        return (
            pod.age_s(now) <= self.metrics_staleness_s
            and pod.waiting <= self.queue_depth_threshold
            and pod.kv_usage <= self.kv_cache_util_threshold
        )

    def saturated(self, pods: Sequence[ReplicaView], now: float) -> bool:
        """No pod has capacity (stale metrics count as none)."""
        return not any(self.has_capacity(pod, now) for pod in pods)

    def scores(
        self, request: SimRequest, pods: Sequence[ReplicaView], hashes: Sequence[int]
    ) -> list[float]:
        """The weighted score of every pod for `request`, in `pods` order."""
        waiting = [pod.waiting for pod in pods]
        low, high = min(waiting), max(waiting)
        spread = high - low
        prefix_scores = [0.0] * len(pods)
        if hashes:
            for pod, blocks in self._prefix.matched_blocks(hashes).items():
                prefix_scores[pod] = blocks / len(hashes)
        queue_w, kv_w, prefix_w = self.queue_weight, self.kv_cache_weight, self.prefix_weight
        return [
            queue_w * ((high - pod.waiting) / spread if spread else 1.0)
            + kv_w * (1.0 - pod.kv_usage)
            + prefix_w * prefix_score
            for pod, prefix_score in zip(pods, prefix_scores, strict=True)
        ]

    def choose(
        self, request: SimRequest, replicas: Sequence[ReplicaView], now: float
    ) -> str | None:
        if self._num_pods != len(replicas):
            self._prefix = PrefixIndex(len(replicas), self.lru_capacity_per_pod)
            self._num_pods = len(replicas)
        if request.slo_class in self.sheddable_classes and self.saturated(replicas, now):
            return None
        hashes = block_hashes(request)[: self.max_prefix_blocks]
        scores = self.scores(request, replicas, hashes)
        best = max(scores)
        ties = [pod for pod, score in enumerate(scores) if score == best]
        chosen = ties[self._rng.randrange(len(ties))] if len(ties) > 1 else ties[0]
        self._prefix.add(hashes, chosen)
        return replicas[chosen].replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass

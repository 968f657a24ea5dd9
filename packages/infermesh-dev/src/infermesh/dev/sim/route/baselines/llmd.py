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
- saturation detector: a pod has capacity when its metrics are at most `metricsStalenessThreshold`
  old (2 s, the current flag default; releases before 1.0 used 200 ms), its waiting queue is at
  most 5 and its KV usage at most 0.8; when no pod has capacity the pool is saturated and
  sheddable requests (SLO class "batch" here) are rejected.

The real scheduler scores every pod per request; this one finds the same maximum from an index of
the scraped telemetry (`TelemetryIndex`, fed by `observe`) and the prefix matches, so a decision
costs O(distinct queue lengths + matched pods), not O(pods). `scores` is the plain definition.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Collection, Sequence

from infermesh.dev.sim.route.baselines.telemetry_index import TelemetryIndex
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
        metrics_staleness_s: float = 2.0,
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
        self._telemetry = TelemetryIndex(0)
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
            self._rebuild(replicas)
        if request.slo_class in self.sheddable_classes and self.saturated(replicas, now):
            return None
        hashes = block_hashes(request)[: self.max_prefix_blocks]
        chosen = self._pick(hashes)
        self._prefix.add(hashes, chosen)
        return replicas[chosen].replica_id

    def _rebuild(self, replicas: Sequence[ReplicaView]) -> None:
        self._num_pods = len(replicas)
        self._prefix = PrefixIndex(len(replicas), self.lru_capacity_per_pod)
        self._telemetry = TelemetryIndex(len(replicas))
        for pod, view in enumerate(replicas):
            self._telemetry.update(pod, view.waiting, view.kv_usage)

    def _pick(self, hashes: Sequence[int]) -> int:
        """The max-score pod, as `scores` would rank it, without scoring every pod.

        Pods the prefix index does not know score `queue + kv`, best at each queue length's
        lowest KV usage; pods it knows are scored in full. A pod with a prefix match outscores
        its own group, so when a group ties the maximum none of its pods has a match.
        """
        telemetry = self._telemetry
        low, high = telemetry.waiting_range()
        spread = high - low
        queue_w, kv_w, prefix_w = self.queue_weight, self.kv_cache_weight, self.prefix_weight
        best = -math.inf
        tied_groups: list[list[int]] = []
        for waiting, kv_usage, pods in telemetry.best_per_waiting():
            score = queue_w * ((high - waiting) / spread if spread else 1.0) + kv_w * (
                1.0 - kv_usage
            )
            if score > best:
                best, tied_groups = score, [pods]
            elif score == best:
                tied_groups.append(pods)
        tied_pods: list[int] = []
        matched = self._prefix.matched_blocks(hashes) if hashes else {}
        for pod, blocks in matched.items():
            waiting = telemetry.waiting[pod]
            score = (
                queue_w * ((high - waiting) / spread if spread else 1.0)
                + kv_w * (1.0 - telemetry.kv_usage[pod])
                + prefix_w * (blocks / len(hashes))
            )
            if score > best:
                best, tied_groups, tied_pods = score, [], [pod]
            elif score == best:
                tied_pods.append(pod)
        total = len(tied_pods) + sum(len(pods) for pods in tied_groups)
        draw = self._rng.randrange(total) if total > 1 else 0
        if draw < len(tied_pods):
            return tied_pods[draw]
        draw -= len(tied_pods)
        for pods in tied_groups:
            if draw < len(pods):
                return pods[draw]
            draw -= len(pods)
        raise AssertionError("unreachable: the draw is below the tie count")

    def observe(self, replica: ReplicaView, now: float) -> None:
        if replica.index < self._num_pods:
            self._telemetry.update(replica.index, replica.waiting, replica.kv_usage)

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass

"""The load-oblivious and in-flight-count baselines: round robin, random, least request, P2C.

Implemented from vllm-router's (a fork of SGLang's router) published policies
(https://github.com/vllm-project/router, `src/policies/`): round_robin cycles a counter over the
workers, random draws uniformly, power_of_two draws two distinct workers and takes the one with
fewer requests in flight. Least request sends to a worker with the fewest in flight (Envoy's and
Ray Serve's classic). They never reject and never look at replica telemetry.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from infermesh.dev.sim.route.baselines.load_index import LoadIndex
from infermesh.dev.sim.route.strategy import ReplicaView, SimRequest

__all__ = ["LeastRequest", "PowerOfTwo", "RandomChoice", "RoundRobin"]


class RoundRobin:
    """Replica `k mod n` for the k-th request (vllm-router `round_robin`)."""

    name = "round_robin"

    def __init__(self, rng: random.Random) -> None:
        self._next = 0

    def choose(self, request: SimRequest, replicas: Sequence[ReplicaView], now: float) -> str:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica.replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass


class RandomChoice:
    """A replica drawn uniformly at random (vllm-router `random`)."""

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: SimRequest, replicas: Sequence[ReplicaView], now: float) -> str:
        return replicas[self._rng.randrange(len(replicas))].replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass


class PowerOfTwo:
    """Two distinct replicas drawn at random; the one with fewer in flight (vllm-router
    `power_of_two`, Mitzenmacher's two choices). The router's in-flight count is always current,
    unlike the `/get_load` poll vllm-router can use instead, so this is P2C at its best."""

    name = "power_of_two"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, request: SimRequest, replicas: Sequence[ReplicaView], now: float) -> str:
        if len(replicas) == 1:
            return replicas[0].replica_id
        first, second = self._rng.sample(range(len(replicas)), 2)
        a, b = replicas[first], replicas[second]
        return (b if b.in_flight < a.in_flight else a).replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        pass


class LeastRequest:
    """A replica with the fewest requests in flight from this router (ties at random), O(1)."""

    name = "least_request"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._loads: LoadIndex | None = None
        self._index_of: dict[str, int] = {}

    def choose(self, request: SimRequest, replicas: Sequence[ReplicaView], now: float) -> str:
        if self._loads is None or len(self._loads.loads) != len(replicas):
            self._loads = LoadIndex(len(replicas))
            self._index_of = {view.replica_id: i for i, view in enumerate(replicas)}
        chosen = self._loads.least_loaded(self._rng)
        self._loads.started(chosen)
        return replicas[chosen].replica_id

    def observe(self, replica: ReplicaView, now: float) -> None:
        pass

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        if self._loads is not None and replica_id in self._index_of:
            self._loads.finished(self._index_of[replica_id])

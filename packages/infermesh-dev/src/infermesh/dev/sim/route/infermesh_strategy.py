"""InferMesh's default routing, run by its real code against the simulated fleet.

Telemetry reaches a real `StateStore` as `ModelStateDelta`s (what the agent's vLLM adapter
publishes: running, waiting, KV usage, windowed TTFT/ITL/e2e means and token rates, stamped with
the scrape time). Each decision is `ScoringEngine.rank` with the built-in scorers at their default
weights (queue, KV headroom, prefix affinity, net penalty from the per-link RTT, GPU health),
over a real `InflightTracker` that holds a reservation per routed request and gets its outcome
(TTFT) when the request finishes, as the router reports it. The prefix keys are the router's own
(`infermesh.router.features.token_prefix_keys` of the token ids). GPU telemetry reaches the
same store as `GpuStateDelta`s (`observe_gpu`), each target labelled with its GPU's UUID, so the
`gpu_health` scorer sees the degraded replica's throttled GPU. With hedging on, each decision
also keeps the next-ranked targets (`backups`) for the hedge, as the router's decision does.
"""

from __future__ import annotations

from collections.abc import Sequence

from infermesh.core.config import ScoringConfig
from infermesh.core.model import (
    GpuState,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    SloClass,
    TargetKey,
)
from infermesh.core.scoring.engine import ScoringEngine
from infermesh.core.scoring.inflight import InflightTracker
from infermesh.core.scoring.prefix import hrw_weight
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.core.scoring.state import StateStore
from infermesh.dev.sim.route.gpu_telemetry import gpu_uuid_of
from infermesh.dev.sim.route.strategy import ReplicaView, SimRequest, prompt_token_ids
from infermesh.router.features import token_prefix_keys

__all__ = ["MODEL", "InferMeshStrategy", "prefix_key", "prefix_keys"]

MODEL = "sim-model"


def prefix_keys(request: SimRequest) -> tuple[int, ...]:
    """The keys the router computes from a prompt given as token ids (its first 64, 128, ...
    ids)."""
    return token_prefix_keys(prompt_token_ids(request))


def prefix_key(request: SimRequest) -> int:
    """The router's single prefix key of the prompt (over its first 64 token ids)."""
    return prefix_keys(request)[0]


class _Cell:
    """A routing domain: a StateStore, an InflightTracker and a ScoringEngine of its own."""

    def __init__(self, scoring: ScoringConfig, index: int) -> None:
        self.store = StateStore()
        self.inflight = InflightTracker(
            ewma_alpha=scoring.outcome_ewma_alpha, id_prefix=f"sim{index}"
        )
        self.rtt_by_node: dict[str, float] = {}
        self.engine = ScoringEngine.from_config(
            self.store,
            self.inflight,
            {s.name: s for s in builtin_scorers()},
            scoring,
            rtt_estimate=self.rtt_by_node.get,
        )
        self.hash_id = f"cell{index}"


class InferMeshStrategy:
    """Ranks with the live system's StateStore, InflightTracker and ScoringEngine.

    `cell_size` (None: one cell) splits the fleet into routing cells of that many consecutive
    replicas, each with its own store, tracker and engine; a request goes to the cell that
    rendezvous-hashing of its prefix key picks (so a prefix stays in one cell) and is ranked
    against that cell's replicas only. `ScoringEngine.rank` and `StateStore.apply_model_delta`
    are O(candidates), so cells bound a decision's cost at 10,000 replicas; one cell is the
    live system exactly.
    """

    name = "infermesh"

    def __init__(self, scoring: ScoringConfig | None = None, cell_size: int | None = None) -> None:
        if cell_size is not None and cell_size < 1:
            raise ValueError("cell_size must be positive")
        self.scoring = scoring or ScoringConfig()
        self.cell_size = cell_size
        self._cells: list[_Cell] = []
        self._target_of: dict[str, TargetKey] = {}
        self._cell_of: dict[str, _Cell] = {}
        self._replica_of: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._reservations: dict[str, tuple[str, str]] = {}
        """request id -> (reservation id, replica id) of its first attempt."""
        self._ttfts: dict[str, float] = {}
        self._gpus: dict[str, GpuState] = {}
        self.unroutable = 0
        self.backup_targets = 0
        """Next-ranked targets to keep per decision for hedges (set by the simulator)."""
        self.backups: dict[str, tuple[str, ...]] = {}

    @property
    def store(self) -> StateStore:
        """The first cell's store (the only one unless `cell_size` is set)."""
        return self._cells[0].store

    def _cell(self, view: ReplicaView) -> _Cell:
        index = view.index // self.cell_size if self.cell_size else 0
        while len(self._cells) <= index:
            self._cells.append(_Cell(self.scoring, len(self._cells)))
        return self._cells[index]

    def _key(self, view: ReplicaView) -> TargetKey:
        key = self._target_of.get(view.replica_id)
        if key is None:
            key = TargetKey(model=MODEL, node=view.node, endpoint=f"http://{view.replica_id}")
            cell = self._cell(view)
            self._target_of[view.replica_id] = key
            self._cell_of[view.replica_id] = cell
            self._replica_of[key.target_id] = view.replica_id
            cell.rtt_by_node[view.node] = view.rtt_s
        return key

    def observe(self, replica: ReplicaView, now: float) -> None:
        key = self._key(replica)
        version = self._versions.get(replica.replica_id, 0) + 1
        self._versions[replica.replica_id] = version
        labels = {}
        if version == 1:  # the target runs on its own GPU (the adapter's gpu_uuid label)
            uuid = gpu_uuid_of(replica.replica_id)
            labels["labels"] = Labels(node=replica.node, gpu_uuid=uuid)
        self._cell_of[replica.replica_id].store.apply_model_delta(
            ModelStateDelta(
                key=key,
                version=version,
                changes={
                    **labels,
                    "running": float(replica.running),
                    "waiting": float(replica.waiting),
                    "kv_cache_usage": replica.kv_usage,
                    "ttft_s": replica.ttft_s,
                    "itl_s": replica.itl_s,
                    "e2e_s": replica.e2e_s,
                    "prompt_tokens_per_s": replica.prompt_tokens_per_s,
                    "generation_tokens_per_s": replica.generation_tokens_per_s,
                    "max_num_seqs": replica.max_num_seqs or None,
                    "last_updated": replica.telemetry_s,
                },
            )
        )

    def observe_gpu(self, replica: ReplicaView, gpu: GpuState, now: float) -> None:
        """A scrape of `replica`'s GPU arrived: the delta from the last one goes to its cell's
        store, as the agent's DCGM adapter publishes it."""
        self._key(replica)
        last = self._gpus.get(replica.replica_id)
        delta = last.delta_to(gpu) if last is not None else GpuState(key=gpu.key).delta_to(gpu)
        self._gpus[replica.replica_id] = gpu
        self._cell_of[replica.replica_id].store.apply_gpu_delta(delta)

    def _cell_for(self, key: int) -> _Cell:
        cells = self._cells
        return cells[0] if len(cells) == 1 else max(cells, key=lambda c: hrw_weight(key, c.hash_id))

    def fleet_of(self, request: SimRequest) -> Sequence[ModelState]:
        """The replicas `request` is ranked against (its cell's), for admission's saturation."""
        if not self._cells:
            return ()
        cell = self._cells[0] if len(self._cells) == 1 else self._cell_for(prefix_key(request))
        return cell.store.candidates(MODEL)

    def choose(
        self, request: SimRequest, replicas: Sequence[ReplicaView], now: float
    ) -> str | None:
        keys = prefix_keys(request)
        key = keys[0]
        features = RequestFeatures(
            model=MODEL,
            slo_class=SloClass(request.slo_class),
            prompt_tokens=request.prompt_tokens,
            max_output_tokens=request.output_tokens,
            prefix_key=key,
            prefix_keys=keys,
            tenant=request.tenant,
            request_id=request.request_id,
        )
        cells = self._cells
        if not cells:
            self.unroutable += 1
            return None
        cell = self._cell_for(key)
        ranking = cell.engine.rank(features, now, max_targets=1 + self.backup_targets)
        if not ranking.targets:
            self.unroutable += 1
            return None
        target_id = ranking.targets[0].target_id
        replica_id = self._replica_of[target_id]
        reservation = cell.inflight.reserve(target_id, now)
        self._reservations[request.request_id] = (reservation.reservation_id, replica_id)
        if self.backup_targets:
            self.backups[request.request_id] = tuple(
                self._replica_of[t.target_id] for t in ranking.targets[1:]
            )
        return replica_id

    def on_first_token(self, request: SimRequest, replica_id: str | None, now: float) -> None:
        self._ttfts[request.request_id] = now - request.arrival_s

    def on_cancel(self, request: SimRequest, replica_id: str, now: float) -> None:
        """An attempt on `replica_id` lost the hedge race and was cancelled: its reservation
        (if it was the first attempt) ends as the router reports a cancelled attempt (499)."""
        held = self._reservations.get(request.request_id)
        if held is None or held[1] != replica_id:
            return
        del self._reservations[request.request_id]
        self._cell_of[replica_id].inflight.release_outcome(
            held[0], now, status=499, latency_s=now - request.arrival_s
        )

    def on_finish(self, request: SimRequest, replica_id: str, now: float, ok: bool) -> None:
        held = self._reservations.pop(request.request_id, None)
        ttft_s = self._ttfts.pop(request.request_id, None)
        status = 200 if ok else 503
        inflight = self._cell_of[replica_id].inflight
        if held is not None:
            inflight.release_outcome(held[0], now, status=status, latency_s=now - request.arrival_s)
        target_id = self._target_of[replica_id].target_id
        inflight.record_outcome(target_id, ok=ok, status=status, ttft_s=ttft_s)

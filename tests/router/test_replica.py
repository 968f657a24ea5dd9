"""The state replica on its own: when a snapshot becomes live, what a resync replaces, and the
readiness it reports, driven by explicit connection events and a fake clock."""

from __future__ import annotations

from infermesh.core.model import GpuKey, GpuStateDelta, ModelStateDelta, TargetKey
from infermesh.core.scoring.state import StateStore
from infermesh.router.replica import StateReplica

A = TargetKey(model="m", node="n", endpoint="http://a:8000")
B = TargetKey(model="m", node="n", endpoint="http://b:8000")
GPU = GpuKey(node="n", gpu_uuid="GPU-0")
AGENT = "unix:///run/agent.sock"


def delta(key: TargetKey, version: int, **changes: object) -> ModelStateDelta:
    return ModelStateDelta(key=key, version=version, changes={"last_updated": 100.0, **changes})


def synced(replica: StateReplica, *deltas: ModelStateDelta) -> StateReplica:
    replica.begin()
    for d in deltas:
        replica.apply_model(d)
    replica.expect({d.key.target_id: d.version for d in deltas}, {})
    return replica


def test_a_snapshot_becomes_live_only_once_it_holds_everything_the_agent_listed() -> None:
    swapped: list[StateStore] = []
    replica = StateReplica(on_swap=swapped.append)
    replica.begin()
    replica.apply_model(delta(A, 5))
    assert not replica.expect({A.target_id: 5, B.target_id: 3}, {GPU: 2})
    assert replica.live is None
    replica.apply_model(delta(B, 3))
    assert replica.live is None, "the GPU listed is still missing"
    replica.apply_gpu(GpuStateDelta(key=GPU, version=2, changes={}))
    assert replica.live is not None
    assert swapped == [replica.live]
    assert replica.connected
    assert replica.syncs == 1


def test_a_listed_version_is_reached_by_a_newer_delta_too() -> None:
    replica = StateReplica()
    replica.begin()
    replica.apply_model(delta(A, 4))
    replica.expect({A.target_id: 5}, {})
    assert replica.live is None, "version 4 is older than the listing"
    replica.apply_model(delta(A, 6))
    assert replica.live is not None


def test_deltas_after_the_sync_update_the_live_store() -> None:
    replica = synced(StateReplica(), delta(A, 1))
    replica.apply_model(delta(A, 2, healthy=False))
    assert replica.live is not None
    state = replica.live.get_target(A.target_id)
    assert state is not None
    assert not state.healthy


def test_a_resync_replaces_the_store_even_when_versions_went_backwards() -> None:
    replica = synced(StateReplica(), delta(A, 100), delta(B, 100))
    old = replica.live
    replica.lost(now=10.0)
    replica.begin()
    replica.apply_model(delta(B, 1))
    assert replica.live is old, "the old store serves until the new snapshot is complete"
    replica.expect({B.target_id: 1}, {})
    live = replica.live
    assert live is not old
    assert live is not None
    assert live.get_target(A.target_id) is None
    state = live.get_target(B.target_id)
    assert state is not None
    assert state.version == 1


def test_readiness_lasts_stale_after_s_past_a_lost_connection() -> None:
    replica = StateReplica()
    status = replica.status(now=0.0, stale_after_s=5.0, agent=AGENT)
    assert not status.ready
    assert AGENT in status.reason
    synced(replica, delta(A, 1))
    assert replica.status(now=1.0, stale_after_s=5.0, agent=AGENT).ready
    replica.lost(now=10.0)
    assert not replica.connected
    assert replica.status(now=14.0, stale_after_s=5.0, agent=AGENT).ready
    status = replica.status(now=15.5, stale_after_s=5.0, agent=AGENT)
    assert not status.ready
    assert "stale after 5s" in status.reason
    synced(replica, delta(A, 2))
    assert replica.status(now=20.0, stale_after_s=5.0, agent=AGENT).ready


def test_failed_connection_attempts_do_not_move_the_outage_start() -> None:
    replica = synced(StateReplica(), delta(A, 1))
    replica.lost(now=10.0)
    replica.begin()
    replica.lost(now=12.0)  # a reconnect that failed before its snapshot
    assert replica.disconnected_at == 10.0

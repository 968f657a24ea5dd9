"""The gossip-vs-Serf benchmark: its arithmetic, its log parsing and its lossy proxy.

No timing is asserted (benchmarks measure, tests specify) and no serf or agent is started:
these check that the figures are computed the way docs/benchmarks.md says and that the proxy
drops exactly the inbound UDP it is told to while relaying replies and TCP intact.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def report(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip import report

    return report


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip import cluster

    return cluster


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip import proxy

    return proxy


def _obs(cluster: ModuleType, observer: str, kind: str, member: str, at: float) -> object:
    return cluster.Observation(observer, kind, member, at)


# --------------------------------------------------------------------------- detection


def test_percentile_interpolates_and_is_nan_when_empty(report: ModuleType) -> None:
    assert report.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert report.percentile([1.0, 2.0], 100) == 2.0
    assert math.isnan(report.percentile([], 99))
    with pytest.raises(ValueError, match="outside"):
        report.percentile([1.0], -1)


def test_detection_takes_each_survivors_first_failed_mark_after_the_kill(
    report: ModuleType, cluster: ModuleType
) -> None:
    killed_at = 100.0
    observations = [
        _obs(cluster, "a", "failed", "v", 99.0),  # before the kill: not this one
        _obs(cluster, "a", "suspect", "v", 101.0),  # a suspicion is not a failed mark
        _obs(cluster, "a", "failed", "v", 106.0),
        _obs(cluster, "a", "failed", "v", 107.0),  # a second mark does not move the first
        _obs(cluster, "b", "failed", "v", 105.5),
        _obs(cluster, "b", "failed", "x", 104.0),  # about another member
        _obs(cluster, "v", "failed", "a", 101.0),  # the victim itself does not count
    ]
    run = report.detection_run("v", ["a", "b", "c", "v"], killed_at, observations)
    assert dict(run.delays_s) == {"a": 6.0, "b": 5.5}
    assert run.observers == 3
    assert run.missing == 1  # c never noticed
    assert math.isnan(run.all_know_s)  # not everyone knows
    assert run.first_suspect_s == 1.0  # a's suspicion started it


def test_detection_summary_pools_delays_and_takes_the_median_of_all_know(
    report: ModuleType,
) -> None:
    runs = [
        report.DetectionRun("v1", 3, {"a": 5.0, "b": 6.0, "c": 7.0}),
        report.DetectionRun("v2", 3, {"a": 4.0, "b": 4.0, "c": 10.0}),
        report.DetectionRun("v3", 3, {"a": 6.0, "b": 6.0, "c": 8.0}),
    ]
    summary = report.summarize_detection(runs)
    assert summary.delays == 9
    assert summary.missing == 0
    assert summary.median_s == 6.0  # of 4, 4, 5, 6, 6, 6, 7, 8, 10
    assert summary.max_s == 10.0
    assert summary.p99_s == pytest.approx(8.0 + 2.0 * 0.92)  # rank 7.92: between 8 and 10
    assert summary.all_know_median_s == 8.0  # median of 7, 10, 8
    assert math.isnan(summary.first_suspect_median_s)  # no suspicion was seen


def test_all_know_is_unknown_when_a_run_missed_an_observer(report: ModuleType) -> None:
    runs = [report.DetectionRun("v1", 2, {"a": 5.0, "b": 6.0}), report.DetectionRun("v2", 2, {})]
    summary = report.summarize_detection(runs)
    assert summary.missing == 2
    assert math.isnan(summary.all_know_median_s)
    assert summary.median_s == 5.5


# --------------------------------------------------------------------------- false positives


def test_false_positives_count_lines_about_live_members_inside_the_window(
    report: ModuleType, cluster: ModuleType
) -> None:
    observations = [
        _obs(cluster, "a", "suspect", "lossy", 9.0),  # before the window
        _obs(cluster, "a", "suspect", "lossy", 10.0),  # episode 1 about lossy
        _obs(cluster, "b", "suspect", "lossy", 10.2),
        _obs(cluster, "lossy", "refute", "lossy", 10.4),
        _obs(cluster, "b", "failed", "lossy", 15.0),  # still episode 1 (gap < 10 s)
        _obs(cluster, "c", "failed", "lossy", 15.1),
        _obs(cluster, "a", "suspect", "lossy", 40.0),  # episode 2 (gap >= 10 s)
        _obs(cluster, "lossy", "suspect", "b", 20.0),  # the lossy member suspects b
        _obs(cluster, "lossy", "declared", "b", 24.0),
        _obs(cluster, "a", "failed", "gone", 30.0),  # not a live member
        _obs(cluster, "a", "alive", "lossy", 16.0),  # alive lines are not false positives
        _obs(cluster, "a", "failed", "b", 80.0),  # after the window
    ]
    fp = report.count_false_positives(
        observations,
        start=10.0,
        end=70.0,
        live=["a", "b", "c", "lossy"],
        lossy="lossy",
        loss=0.1,
        duration_s=55.0,
        proxy={"udp_in": 100.0, "udp_dropped": 9.0},
    )
    assert fp.failed_marks == 2
    assert fp.failed_members == 1
    assert fp.suspect_lines == 4
    assert fp.declared == 1
    assert fp.refutations == 1
    assert fp.episodes == 3  # two about lossy, one about b
    assert fp.about_lossy == 2
    assert fp.window_s == 60.0


def test_refutation_counters_replace_refute_lines(report: ModuleType, cluster: ModuleType) -> None:
    fp = report.count_false_positives(
        [_obs(cluster, "a", "suspect", "b", 1.0)],
        start=0.0,
        end=10.0,
        live=["a", "b"],
        lossy="b",
        loss=0.1,
        duration_s=10.0,
        refutations=3,
    )
    assert fp.refutations == 3
    assert fp.episodes == 1


# --------------------------------------------------------------------------- rendering


def _result(report: ModuleType, system: str, median: float, failed_marks: int) -> object:
    fp = report.FalsePositives(
        lossy="n15",
        loss=0.1,
        duration_s=60.0,
        window_s=65.0,
        failed_marks=failed_marks,
        failed_members=min(failed_marks, 1),
        suspect_lines=2,
        declared=0,
        refutations=1,
        episodes=1,
        about_lossy=1,
        proxy={"udp_in": 1000.0, "udp_dropped": 100.0},
    )
    run = report.DetectionRun("n01", 2, {"n02": median, "n03": median})
    return report.SystemResult(system, "v", 3, detection=[run], false_positives=fp)


def test_goals_compare_infermesh_with_serf(report: ModuleType) -> None:
    results = {
        "serf": _result(report, "serf", 6.0, 0),
        "infermesh": _result(report, "infermesh", 5.0, 1),
    }
    assert report.goals(results) == {
        "detection_median_le_serf": True,
        "false_failed_le_serf": False,
        "suspicion_episodes_le_serf": True,
    }
    assert "MISSED" in report.render_goals(results)


def test_without_serf_the_json_line_says_null_and_why(report: ModuleType) -> None:
    results = {"serf": None, "infermesh": _result(report, "infermesh", 5.0, 0)}
    line = report.render_json(results, settings={"members": 3}, skipped={"serf": "not found"})
    assert "\n" not in line
    decoded = json.loads(line)
    assert decoded["serf"] is None
    assert decoded["skipped"] == {"serf": "not found"}
    assert decoded["goals"]["detection_median_le_serf"] is None
    assert decoded["infermesh"]["detection"]["median_s"] == 5.0
    assert decoded["infermesh"]["false_positives"]["failed_marks"] == 0
    table = report.render_table(results)
    assert "detection median s" in table
    assert table.splitlines()[0].split() == ["serf", "infermesh"]


def test_benchmark_without_serf_still_prints_the_json_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks import gossip_vs_serf

    code = gossip_vs_serf.main(
        [
            "--serf",
            str(tmp_path / "no-such-serf"),
            "--skip",
            "infermesh",
            "--loss-duration",
            "0",
            "--log-dir",
            str(tmp_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "serf not measured" in err
    decoded = json.loads(out.strip().splitlines()[-1])
    assert decoded["serf"] is None
    assert "not found" in decoded["skipped"]["serf"]


# --------------------------------------------------------------------------- log lines


def test_serf_log_lines_become_observations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip.serf import SerfSystem

    serf = SerfSystem("serf")
    stamp = "    2026/11/28 09:25:45 "
    assert serf.parse(stamp + "[INFO] serf: EventMemberFailed: n2 127.0.0.1") == ("failed", "n2")
    assert serf.parse(stamp + "[INFO] serf: EventMemberJoin: n10 127.0.0.1") == ("alive", "n10")
    assert serf.parse(stamp + "[INFO] memberlist: Suspect n3 has failed, no acks received") == (
        "suspect",
        "n3",
    )
    assert serf.parse(
        stamp + "[INFO] memberlist: Marking n3 as failed, suspect timeout reached (2 peer "
        "confirmations)"
    ) == ("declared", "n3")
    assert serf.parse(stamp + "[WARN] memberlist: Refuting a suspect message (from: n4)") == (
        "refute",
        "",
    )
    assert serf.parse(stamp + "[DEBUG] memberlist: Failed ping: n2 (timeout reached)") is None


def test_infermesh_gossip_member_lines_become_observations(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip.infermesh import InfermeshSystem, parse_metrics

    mesh = InfermeshSystem(["infermesh"], None)

    def line(**fields: object) -> str:
        return json.dumps({"event": "gossip member", "timestamp": "2026-11-28T09:00:00Z", **fields})

    assert mesh.parse(line(kind="dead", member="n03", incarnation=1)) == ("failed", "n03")
    assert mesh.parse(line(kind="joined", member="n04", incarnation=0)) == ("alive", "n04")
    assert mesh.parse(line(kind="suspect", member="n05", incarnation=2)) == ("suspect", "n05")
    assert mesh.parse(line(kind="updated", member="n05", incarnation=2)) is None
    assert mesh.parse(line(kind="dead", member=7)) is None  # not a member id
    assert mesh.parse('{"event": "gossip member", broken') is None
    assert mesh.parse("plain text mentioning gossip member") is None
    text = (
        "# HELP infermesh_gossip_refutations_total Times ...\n"
        "infermesh_gossip_refutations_total 2.0\n"
        'infermesh_gossip_bytes_total{direction="in"} 10.0\n'
        'infermesh_gossip_bytes_total{direction="out"} 5.0\n'
    )
    assert parse_metrics(text) == {
        "infermesh_gossip_refutations_total": 2.0,
        "infermesh_gossip_bytes_total": 15.0,
    }


def test_infermesh_config_advertises_the_proxy_and_binds_the_real_port(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    import tomllib

    from benchmarks.gossip.cluster import MemberPlan
    from benchmarks.gossip.infermesh import InfermeshSystem

    key = tmp_path / "gossip.key"
    plan = MemberPlan(
        "n15", 15, ("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1:7000",), tmp_path
    )
    config = tomllib.loads(InfermeshSystem(["infermesh"], key).render_config(plan))
    assert config["node"]["id"] == "n15"
    assert config["gossip"]["bind"] == "127.0.0.1:7001"
    assert config["gossip"]["advertise"] == "127.0.0.1:7002"
    assert config["gossip"]["seeds"] == ["127.0.0.1:7000"]
    assert config["gossip"]["key_file"] == str(key)
    assert config["gossip"]["profile"] == "lan"
    assert "inject_loss" not in config["gossip"]  # the proxy injects the loss


# --------------------------------------------------------------------------- lossy proxy


class _Echo(asyncio.DatagramProtocol):
    """A UDP peer that records what it gets and (optionally) answers each datagram."""

    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append((data, addr))
        if self.answer and self.transport is not None:
            self.transport.sendto(b"re:" + data, addr)


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _udp(protocol: _Echo) -> asyncio.DatagramTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: protocol, local_addr=("127.0.0.1", 0)
    )
    return transport


@pytest.mark.anyio
async def test_proxy_drops_exactly_the_drawn_share_of_inbound_udp_and_relays_replies(
    proxy: ModuleType,
) -> None:
    member = _Echo(answer=True)
    member_transport = await _udp(member)
    sender = _Echo(answer=False)
    sender_transport = await _udp(sender)
    target = member_transport.get_extra_info("sockname")[:2]
    lossy = proxy.LossyProxy(("127.0.0.1", 0), target, loss=0.3, rng=random.Random(7))
    await lossy.start()
    try:
        draws = random.Random(7)
        expected_kept = [i for i in range(200) if not draws.random() < 0.3]

        def arrived(count: int) -> Callable[[], bool]:
            return lambda: lossy.stats.udp_in == count

        for i in range(200):
            sender_transport.sendto(b"%d" % i, lossy.address)
            if i % 20 == 19:  # in bursts, so no socket buffer overflows
                await _until(arrived(i + 1))
        await _until(lambda: len(sender.received) == len(expected_kept))
        assert lossy.stats.udp_in == 200
        assert lossy.stats.udp_dropped == 200 - len(expected_kept)
        assert sorted(int(data) for data, _ in member.received) == expected_kept
        # The member's answers reach the sender from the proxy's (the advertised) address.
        assert {addr for _, addr in sender.received} == {lossy.address}
        assert lossy.stats.udp_replies == len(expected_kept)
    finally:
        await lossy.close()
        member_transport.close()
        sender_transport.close()


@pytest.mark.anyio
async def test_proxy_at_full_loss_drops_all_udp_but_forwards_tcp_intact(proxy: ModuleType) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    member = _Echo(answer=True)
    member_transport = await _udp(member)
    sender = _Echo(answer=False)
    sender_transport = await _udp(sender)
    target = server.sockets[0].getsockname()[:2]
    lossy = proxy.LossyProxy(("127.0.0.1", 0), target, loss=1.0)
    await lossy.start()
    try:
        for _ in range(20):
            sender_transport.sendto(b"ping", lossy.address)
        await _until(lambda: lossy.stats.udp_in == 20)
        assert lossy.stats.udp_dropped == 20
        assert member.received == []
        reader, writer = await asyncio.open_connection(*lossy.address)
        writer.write(b"hello")
        await writer.drain()
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        await writer.wait_closed()
        assert lossy.stats.tcp_connections == 1
        lossy.set_loss(0.0)
        with pytest.raises(ValueError, match=r"0\.\.1"):
            lossy.set_loss(1.5)
    finally:
        await lossy.close()
        server.close()
        await server.wait_closed()
        member_transport.close()
        sender_transport.close()


def test_proxy_child_is_steered_over_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip.cluster import ClusterError, free_port
    from benchmarks.gossip.measure import ProxyChild

    with ProxyChild(("127.0.0.1", free_port()), ("127.0.0.1", free_port()), seed=1) as child:
        child.set_loss(0.25)
        stats = child.stats()
        assert stats["loss"] == 0.25
        assert stats["udp_in"] == 0
        with pytest.raises(ClusterError, match=r"0\.\.1"):
            child.set_loss(2.0)
    assert child.popen.returncode == 0


def test_a_cluster_that_does_not_form_is_started_again_in_a_fresh_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from benchmarks.gossip.measure import START_ATTEMPTS, StartFailed, _retrying

    tried: list[Path] = []

    def flaky(run_dir: Path) -> str:
        tried.append(run_dir)
        if len(tried) < START_ATTEMPTS:
            raise StartFailed("member n03 exited with status 1\nbind: address already in use")
        return "measured"

    assert _retrying(tmp_path / "serf-detect-1", flaky) == "measured"
    assert [p.name for p in tried] == ["serf-detect-1", "serf-detect-1-2", "serf-detect-1-3"][
        :START_ATTEMPTS
    ]
    assert "again on fresh ports" in capsys.readouterr().err

    def broken(run_dir: Path) -> str:
        raise StartFailed("never forms")

    with pytest.raises(StartFailed, match="never forms"):
        _retrying(tmp_path / "infermesh-loss", broken)

"""`infermesh sim gossip`: the real SWIM state machine on a simulated network, as a user runs it."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from click.testing import CliRunner

from infermesh.agent.gossip.members import suspicion_min_timeout_s
from infermesh.dev.sim.cli import sim_group
from infermesh.dev.sim.network import NetworkModel
from infermesh.dev.sim.report import RunCost, report_dict
from infermesh.dev.sim.runner import GossipSimSettings, run_gossip_sim

COST = RunCost(wall_s=0.0, cpu_s=0.0, peak_rss_mb=0.0)

DOCUMENTED_KEYS = {
    "scenario", "nodes", "loss", "duration_s", "seed", "profile", "latency_ms", "jitter_ms",
    "bootstrap", "bootstrap_s", "bootstrap_converged", "swim", "join", "failure",
    "false_positives", "traffic", "run",
}  # fmt: skip
JOIN_KEYS = {"node", "seed_node", "at_s", "observers", "knowing", "known_99_99_s", "known_all_s"}
FAILURE_KEYS = {
    "node", "at_s", "observers", "marked_dead", "first_suspect_s", "dead_99_99_s", "dead_all_s",
    "detection_median_s", "detection_p99_s",
}  # fmt: skip
FALSE_POSITIVE_KEYS = {
    "suspected_members", "suspicions", "suspect_events", "dead_members", "dead_events",
}  # fmt: skip
TRAFFIC_KEYS = {
    "simulated_s", "messages", "lost", "messages_per_node_s", "bytes_per_node_s", "bytes_method",
    "by_type",
}  # fmt: skip


def simulate(**overrides: Any) -> dict[str, Any]:
    settings = {"nodes": 50, "duration_s": 30.0, "seed": 3, **overrides}
    return report_dict(run_gossip_sim(GossipSimSettings(**settings)), COST)


@pytest.fixture(scope="module")
def fifty_nodes() -> dict[str, Any]:
    return simulate()


def test_the_same_seed_gives_the_same_numbers(fifty_nodes: dict[str, Any]) -> None:
    again = simulate()
    assert again == fifty_nodes
    other_seed = simulate(seed=4)
    assert other_seed["failure"] != fifty_nodes["failure"]


def test_a_crashed_node_is_marked_dead_by_every_live_node(fifty_nodes: dict[str, Any]) -> None:
    failure = fifty_nodes["failure"]
    assert failure["observers"] == 48  # 50 minus the crashed node and the joiner
    assert failure["marked_dead"] == failure["observers"]
    assert 0 < failure["first_suspect_s"] < failure["detection_median_s"]
    minimum_s = suspicion_min_timeout_s(4.0, 49, 1.0)
    assert minimum_s <= failure["detection_median_s"] <= failure["detection_p99_s"]
    assert failure["detection_p99_s"] <= failure["dead_99_99_s"] == failure["dead_all_s"]


def test_a_join_is_known_by_every_live_node_within_seconds(fifty_nodes: dict[str, Any]) -> None:
    join = fifty_nodes["join"]
    assert join["knowing"] == join["observers"] == 48
    assert 0 < join["known_99_99_s"] <= join["known_all_s"] < 5.0


def test_no_false_suspicions_or_deaths_without_loss(fifty_nodes: dict[str, Any]) -> None:
    assert set(fifty_nodes["false_positives"].values()) == {0}
    assert fifty_nodes["traffic"]["lost"] == 0


def test_the_report_has_the_documented_keys(fifty_nodes: dict[str, Any]) -> None:
    assert set(fifty_nodes) == DOCUMENTED_KEYS
    assert set(fifty_nodes["join"]) == JOIN_KEYS
    assert set(fifty_nodes["failure"]) == FAILURE_KEYS
    assert set(fifty_nodes["false_positives"]) == FALSE_POSITIVE_KEYS
    assert set(fifty_nodes["traffic"]) == TRAFFIC_KEYS
    assert set(fifty_nodes["run"]) == {"wall_s", "cpu_s", "peak_rss_mb"}
    traffic = fifty_nodes["traffic"]
    assert traffic["bytes_method"] in ("codec-sample", "field-estimate")
    assert {"Ping", "Ack", "Gossip"} <= set(traffic["by_type"])
    assert traffic["messages_per_node_s"] > 1.0  # at least a ping and an ack per probe interval
    assert traffic["bytes_per_node_s"] > 50 * traffic["messages_per_node_s"]


def test_loss_loses_probes_but_every_number_stays_finite() -> None:
    report = simulate(loss=0.1)

    json.dumps(report, allow_nan=False)  # no NaN or infinity anywhere
    assert report["traffic"]["by_type"]["Ping"]["lost"] > 0
    assert report["traffic"]["lost"] > 0.05 * report["traffic"]["messages"]
    # TCP fallback pings and their acks travel on streams, which the network never loses.
    by_type = report["traffic"]["by_type"]
    assert by_type["Ping/tcp"]["messages"] > 0
    assert by_type["Ping/tcp"]["lost"] == by_type["Ack/tcp"]["lost"] == 0
    assert report["failure"]["marked_dead"] == report["failure"]["observers"]
    assert report["join"]["knowing"] == report["join"]["observers"]


def test_a_from_scratch_bootstrap_converges_before_the_events() -> None:
    # Past the longest (unconfirmed) suspicion timeout, so every live node has marked it dead.
    report = simulate(nodes=20, duration_s=40.0, bootstrap="join")

    assert report["bootstrap_converged"]
    assert report["bootstrap_s"] > 0
    assert report["failure"]["marked_dead"] == report["failure"]["observers"] == 18
    assert report["false_positives"]["dead_members"] == 0


def test_cli_prints_a_table_and_one_json_line() -> None:
    result = CliRunner().invoke(sim_group, ["gossip", "--nodes", "12", "--duration", "20"])

    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["nodes"] == 12
    assert any("detection median / p99" in line for line in lines[:-1])
    assert report["run"]["peak_rss_mb"] > 0


def test_cli_json_flag_prints_only_json_and_honours_the_options() -> None:
    args = ["gossip", "--nodes", "10", "--duration", "10", "--seed", "5", "--json"]
    args += ["--profile", "wan", "--latency-ms", "30", "--jitter-ms", "0", "--loss", "0.05"]
    result = CliRunner().invoke(sim_group, args)

    assert result.exit_code == 0, result.output
    [line] = result.output.strip().splitlines()
    report = json.loads(line)
    assert (report["profile"], report["latency_ms"], report["jitter_ms"]) == ("wan", 30.0, 0.0)
    assert (report["loss"], report["seed"]) == (0.05, 5)
    assert report["swim"]["probe_interval_s"] == 5.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nodes", "3"], "--nodes"),
        (["--loss", "1"], "--loss"),
        (["--nodes", "5000", "--bootstrap", "join"], "at most 1000 nodes"),
    ],
)
def test_cli_rejects_bad_input_with_a_clear_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(sim_group, ["gossip", *args])

    assert result.exit_code == 2
    assert message in result.output


def test_network_model_loses_datagrams_at_the_given_rate_and_never_streams() -> None:
    network = NetworkModel(latency_s=0.01, jitter_s=0.002, loss=0.2)
    rng = random.Random(1)
    delays = [network.datagram_delay_s(rng) for _ in range(20_000)]

    lost = sum(1 for delay in delays if delay is None)
    assert lost / len(delays) == pytest.approx(0.2, abs=0.01)
    assert all(0.008 <= delay <= 0.012 for delay in delays if delay is not None)
    assert all(network.stream_delay_s(rng) >= 0.024 for _ in range(1000))
    assert all(network.stream_reply_delay_s(rng) >= 0.008 for _ in range(1000))

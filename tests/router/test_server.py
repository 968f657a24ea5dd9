"""The router's composition root: `router.scoring` picks the mode, and bad settings are clear
errors at start-up rather than failures on the first request."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from infermesh.core.config import ConfigError, load_config
from infermesh.core.scoring.scorers import builtin_scorers
from infermesh.router.agent_scoring import AgentScoring
from infermesh.router.cli import router_group
from infermesh.router.local_scoring import LocalScoring
from infermesh.router.plugin import openai_http_transport
from infermesh.router.server import build_app

TRANSPORTS = {"openai-http": openai_http_transport}
SCORERS = {s.name: s for s in builtin_scorers()}


def test_local_scoring_is_the_default_and_uses_the_runtime_transports() -> None:
    config = load_config(None, environ={})
    assert config.router.scoring == "local"
    config.runtimes = []
    app = build_app(config, TRANSPORTS, SCORERS)
    assert isinstance(app.scoring, LocalScoring)


def test_agent_scoring_is_chosen_by_config() -> None:
    config = load_config(None, environ={}, overrides=[("router.scoring", "agent")])
    app = build_app(config, TRANSPORTS)
    assert isinstance(app.scoring, AgentScoring)


def test_an_unknown_scoring_mode_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"router\.scoring.*local, agent.*'remote'"):
        load_config(None, environ={}, overrides=[("router.scoring", "remote")])


def test_a_weight_for_an_unknown_scorer_fails_local_mode_at_start_up() -> None:
    config = load_config(None, environ={})
    config.scoring.weights = {"nope": 1.0}
    with pytest.raises(ConfigError, match=r"scoring\.weights.*'nope'"):
        build_app(config, TRANSPORTS, SCORERS)


def test_the_run_command_refuses_an_unknown_scoring_flag() -> None:
    result = CliRunner().invoke(router_group, ["run", "--scoring", "remote"])
    assert result.exit_code == 2
    assert "'remote' is not one of 'local', 'agent'" in result.output

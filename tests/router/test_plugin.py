"""The router's plugin: found through its entry point, and its command's start-up errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from infermesh.core.cli import build_cli
from infermesh.core.contracts import Transport, TransportContext
from infermesh.core.plugins import PluginHost


@pytest.fixture
def host() -> PluginHost:
    return PluginHost.load(allow=["core", "router"])


def test_the_openai_http_transport_and_router_command_are_registered(host: PluginHost) -> None:
    transport = host.transports()["openai-http"](TransportContext())
    assert isinstance(transport, Transport)
    assert "router" in host.commands()


def test_router_run_help_lists_the_documented_flags(host: PluginHost) -> None:
    result = CliRunner().invoke(build_cli(host), ["router", "run", "--help"])
    assert result.exit_code == 0
    for flag in ("--config", "--listen", "--agent", "--max-body-bytes", "--log-level"):
        assert flag in result.output


def test_a_bad_listen_address_is_refused_naming_the_key(host: PluginHost) -> None:
    result = CliRunner().invoke(
        build_cli(host), ["router", "run", "--listen", "nowhere"], env={"INFERMESH_CONFIG": ""}
    )
    assert result.exit_code != 0
    assert "router.listen" in result.output
    assert "HOST:PORT" in result.output

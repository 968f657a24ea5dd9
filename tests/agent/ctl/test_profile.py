"""Where the CLI connects: flags beat environment variables, which beat the chosen profile of the
CLI config file, whose relative paths are relative to the file; anything missing or wrong is a
usage error (exit 2) that says how to set it."""

from __future__ import annotations

from pathlib import Path

import pytest

from infermesh.agent.ctl.errors import CtlError, ExitCode
from infermesh.agent.ctl.profile import (
    DEFAULT_TIMEOUT_S,
    ConnectionFlags,
    config_path,
    resolve_settings,
)

PROFILES = """
default_profile = "prod"

[profiles.prod]
endpoint = "10.0.0.1:7960"
ca = "certs/ca.pem"
cert = "certs/alice.pem"
key = "/abs/alice-key.pem"
timeout = 3

[profiles.lab]
endpoint = "127.0.0.1:7960"
ca = "lab/ca.pem"
cert = "lab/bob.pem"
key = "lab/bob-key.pem"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "conf" / "cli.toml"
    path.parent.mkdir()
    path.write_text(PROFILES)
    return path


def env_for(config_file: Path, **extra: str) -> dict[str, str]:
    return {"INFERMESH_CLI_CONFIG": str(config_file), **extra}


def test_the_default_profile_is_used_with_paths_relative_to_the_file(
    config_file: Path, tmp_path: Path
) -> None:
    settings = resolve_settings(ConnectionFlags(), env_for(config_file), tmp_path)
    assert settings.endpoint == "10.0.0.1:7960"
    assert settings.ca == str(config_file.parent / "certs" / "ca.pem")
    assert settings.cert == str(config_file.parent / "certs" / "alice.pem")
    assert settings.key == "/abs/alice-key.pem"
    assert settings.timeout_s == 3.0
    assert settings.profile == "prod"


def test_flags_beat_environment_variables_which_beat_the_profile(
    config_file: Path, tmp_path: Path
) -> None:
    env = env_for(
        config_file,
        INFERMESH_ENDPOINT="10.9.9.9:1",
        INFERMESH_CERT="/env/cert.pem",
        INFERMESH_PROFILE="lab",
    )
    flags = ConnectionFlags(endpoint="10.0.0.7:7960", timeout_s=1.5)
    settings = resolve_settings(flags, env, tmp_path)
    assert settings.endpoint == "10.0.0.7:7960"  # flag
    assert settings.cert == "/env/cert.pem"  # environment
    assert settings.key == str(config_file.parent / "lab" / "bob-key.pem")  # profile "lab"
    assert settings.timeout_s == 1.5
    assert settings.profile == "lab"


def test_the_profile_flag_picks_a_profile(config_file: Path, tmp_path: Path) -> None:
    flags = ConnectionFlags(profile="lab")
    settings = resolve_settings(flags, env_for(config_file), tmp_path)
    assert settings.endpoint == "127.0.0.1:7960"
    assert settings.timeout_s == DEFAULT_TIMEOUT_S


def test_the_config_file_lives_under_xdg_config_home_or_the_home_directory(
    tmp_path: Path,
) -> None:
    assert config_path({"XDG_CONFIG_HOME": "/x"}, tmp_path) == (
        Path("/x/infermesh/cli.toml"),
        False,
    )
    assert config_path({}, tmp_path) == (tmp_path / ".config" / "infermesh" / "cli.toml", False)
    assert config_path({"INFERMESH_CLI_CONFIG": "/etc/im.toml"}, tmp_path) == (
        Path("/etc/im.toml"),
        True,
    )


def test_without_any_endpoint_the_error_says_how_to_set_one(tmp_path: Path) -> None:
    with pytest.raises(CtlError) as missing:
        resolve_settings(ConnectionFlags(ca="ca.pem"), {}, tmp_path)
    assert missing.value.exit_code == ExitCode.USAGE
    message = str(missing.value)
    assert "--endpoint HOST:PORT" in message
    assert "INFERMESH_ENDPOINT" in message
    assert str(tmp_path / ".config" / "infermesh" / "cli.toml") in message


def test_a_missing_client_certificate_is_named_with_its_flag_and_variable(tmp_path: Path) -> None:
    flags = ConnectionFlags(endpoint="127.0.0.1:7960", ca="ca.pem")
    with pytest.raises(CtlError) as missing:
        resolve_settings(flags, {}, tmp_path)
    assert "no client certificate: pass --cert PATH, set INFERMESH_CERT" in str(missing.value)


def test_an_unknown_profile_lists_the_known_ones(config_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CtlError) as unknown:
        resolve_settings(ConnectionFlags(profile="staging"), env_for(config_file), tmp_path)
    assert str(unknown.value) == f"no profile 'staging' in {config_file} (profiles: lab, prod)"
    assert unknown.value.exit_code == ExitCode.USAGE


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[profiles.x]\nendpoint = 7\n", "profiles.x.endpoint: expected a non-empty string"),
        ("[profiles.x]\nhost = 'a'\n", "profiles.x: unknown key 'host'"),
        ("default_profile = 'y'\n", "default_profile 'y' has no [profiles.y] table"),
        ("[profiles.x\n", "is not valid TOML"),
    ],
)
def test_a_broken_config_file_is_a_usage_error_naming_the_file_and_key(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "cli.toml"
    path.write_text(text)
    with pytest.raises(CtlError) as broken:
        resolve_settings(ConnectionFlags(profile="x"), env_for(path), tmp_path)
    assert str(path) in str(broken.value)
    assert expected in str(broken.value)
    assert broken.value.exit_code == ExitCode.USAGE


def test_a_bad_endpoint_shows_the_expected_form(tmp_path: Path) -> None:
    flags = ConnectionFlags(endpoint="agent-1", ca="a", cert="b", key="c")
    with pytest.raises(CtlError) as bad:
        resolve_settings(flags, {}, tmp_path)
    assert "endpoint: expected HOST:PORT" in str(bad.value)

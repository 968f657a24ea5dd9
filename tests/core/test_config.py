"""Configuration: TOML file < INFERMESH_* environment < flags; errors an operator can fix."""

from __future__ import annotations

import typing
from pathlib import Path

import attrs
import pytest

from infermesh.core.config import (
    Config,
    ConfigError,
    NodeConfig,
    RuntimeConfig,
    load_config,
    parse_host_port,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "infermesh.toml"
    path.write_text(
        """
        [node]
        id = "gpu-node-1"

        [router]
        listen = "0.0.0.0:8080"
        max_body_bytes = 1024

        [[runtimes]]
        kind = "vllm"
        url = "http://127.0.0.1:8001"

        [[runtimes]]
        kind = "vllm"
        url = "http://127.0.0.1:8002"
        poll_interval_s = 0.5
        options = { api_key = "secret" }

        [scoring.weights]
        queue = 2
        """
    )
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- sources and precedence


def test_defaults_need_no_file_and_no_environment() -> None:
    config = load_config(environ={})
    assert config.router.listen == "127.0.0.1:8080"
    assert config.runtimes == []
    assert config.agent_target() == f"unix://{config.agent.socket}"


def test_file_values_are_structured_into_typed_config(config_file: Path) -> None:
    config = load_config(config_file, environ={})
    assert config.node.id == "gpu-node-1"
    assert config.router.max_body_bytes == 1024
    assert config.runtimes[1] == RuntimeConfig(
        kind="vllm",
        url="http://127.0.0.1:8002",
        poll_interval_s=0.5,
        options={"api_key": "secret"},
    )
    assert config.scoring.weights == {"queue": 2.0}


def test_environment_overrides_file_and_flags_override_both(config_file: Path) -> None:
    environ = {
        "INFERMESH_ROUTER__LISTEN": "0.0.0.0:9000",
        "INFERMESH_ROUTER__MAX_BODY_BYTES": "2048",
        "INFERMESH_NODE__ZONE": "eu-1",
    }
    config = load_config(
        config_file, environ=environ, overrides=[("router.listen", "127.0.0.1:9999", "--listen")]
    )
    assert config.router.listen == "127.0.0.1:9999"  # flag beats env beats file
    assert config.router.max_body_bytes == 2048  # env beats file
    assert config.node.id == "gpu-node-1"  # file beats default
    assert config.node.zone == "eu-1"  # env beats default


def test_flags_that_were_not_given_change_nothing(config_file: Path) -> None:
    config = load_config(config_file, environ={}, overrides=[("router.listen", None)])
    assert config.router.listen == "0.0.0.0:8080"


def test_config_path_comes_from_infermesh_config_when_not_given(config_file: Path) -> None:
    config = load_config(environ={"INFERMESH_CONFIG": str(config_file)})
    assert config.node.id == "gpu-node-1"


def test_environment_strings_stay_verbatim_and_other_types_are_parsed() -> None:
    config = load_config(
        environ={
            "INFERMESH_NODE__ID": "007",
            "INFERMESH_PLUGINS__STRICT": "true",
            "INFERMESH_PLUGINS__BLOCK": "triton, dcgm",
            "INFERMESH_PLUGINS__ALLOW": '["vllm"]',
            "INFERMESH_SCORING__WEIGHTS__PREFIX": "0",
            "INFERMESH_RUNTIMES": '[{kind = "vllm", url = "http://127.0.0.1:8001"}]',
            "INFERMESH_PLUGINS": "not-a-config-key",
        }
    )
    assert config.node.id == "007"
    assert config.plugins.strict is True
    assert config.plugins.block == ["triton", "dcgm"]
    assert config.plugins.allow == ["vllm"]
    assert config.scoring.weights == {"prefix": 0.0}
    assert config.runtimes == [RuntimeConfig(kind="vllm", url="http://127.0.0.1:8001")]


def test_runtime_flags_append_to_the_file_runtimes(config_file: Path) -> None:
    extra = {"kind": "vllm", "url": "http://127.0.0.1:8003"}
    config = load_config(config_file, environ={}, overrides=[("runtimes[]", extra, "--runtime")])
    assert [r.url for r in config.runtimes] == [
        "http://127.0.0.1:8001",
        "http://127.0.0.1:8002",
        "http://127.0.0.1:8003",
    ]


# --------------------------------------------------------------------------- errors


def test_wrong_type_in_file_names_file_key_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, '[router]\nmax_body_bytes = "big"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value) == (
        f"{path}: router.max_body_bytes: expected an integer, got string 'big'"
    )


def test_unknown_key_is_reported_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, '[router]\nlisten_addr = "0.0.0.0:1"\n')
    with pytest.raises(
        ConfigError, match=r"router\.listen_addr: unknown key \(did you mean 'listen'\?\)"
    ):
        load_config(path, environ={})


def test_unknown_section_lists_the_known_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "[bogus]\nx = 1\n")
    with pytest.raises(
        ConfigError, match=r"bogus: unknown key \(known keys: agent, control, gossip, gpus, logging"
    ):
        load_config(path, environ={})


def test_missing_required_key_in_runtimes_names_the_table_index(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[[runtimes]]\nkind = "vllm"\nurl = "http://a:1"\n[[runtimes]]\nkind = "vllm"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value) == f"{path}: runtimes[1].url: required key is missing (a string)"


def test_a_table_where_an_array_of_tables_belongs_is_explained(tmp_path: Path) -> None:
    path = write(tmp_path, '[runtimes]\nkind = "vllm"\nurl = "http://a:1"\n')
    with pytest.raises(ConfigError, match=r"runtimes: expected an array of tables, got table"):
        load_config(path, environ={})


def test_a_string_where_a_list_belongs_is_not_split_into_characters(tmp_path: Path) -> None:
    path = write(tmp_path, '[plugins]\nallow = "vllm"\n')
    with pytest.raises(
        ConfigError, match=r"plugins\.allow: expected a list of strings, got string"
    ):
        load_config(path, environ={})


def test_every_problem_in_a_source_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path, '[router]\nlisten = 8080\nmax_attempts = "two"\n[scoring.weights]\nkv = "x"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).splitlines() == [
        f"{path}: router.listen: expected a string, got integer 8080",
        f"{path}: router.max_attempts: expected an integer, got string 'two'",
        f"{path}: scoring.weights.kv: expected a number, got string 'x'",
    ]


def test_bad_toml_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nlisten = \n")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML: .*line 2"):
        load_config(path, environ={})


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'nope.toml'}: config file not found"):
        load_config(tmp_path / "nope.toml", environ={})


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path}: cannot read config file"):
        load_config(tmp_path, environ={})


def test_environment_error_names_the_variable_key_and_type(config_file: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config_file, environ={"INFERMESH_SCORING__STALE_AFTER_S": "soon"})
    assert str(err.value) == (
        "environment variable INFERMESH_SCORING__STALE_AFTER_S: scoring.stale_after_s: "
        "expected a number, got string 'soon'"
    )


def test_misspelled_environment_variable_is_an_unknown_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"INFERMESH_ROUTR__LISTEN: routr: unknown key \(did you mean 'router'",
    ):
        load_config(environ={"INFERMESH_ROUTR__LISTEN": "0.0.0.0:1"})


def test_flag_error_names_the_flag_key_and_type(config_file: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(
            config_file,
            environ={},
            overrides=[("router.max_body_bytes", "lots", "--max-body-bytes")],
        )
    assert str(err.value) == (
        "command-line flag --max-body-bytes: router.max_body_bytes: "
        "expected an integer, got string 'lots'"
    )


def test_flag_without_a_name_is_reported_by_its_key() -> None:
    with pytest.raises(
        ConfigError, match=r"command-line override of logging\.level: logging\.level"
    ):
        load_config(environ={}, overrides=[("logging.level", "loud")])


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[node]\nid = "a|b"', "node.id: must be non-empty and must not contain '|'"),
        (
            '[router]\nlisten = "8080"',
            "router.listen: expected HOST:PORT (e.g. 127.0.0.1:8080), got '8080'",
        ),
        ('[agent]\nmetrics_listen = "host:99999"', "agent.metrics_listen: expected HOST:PORT"),
        ("[router]\nmax_attempts = 0", "router.max_attempts: must be >= 1, got 0"),
        ("[scoring]\nstale_after_s = 0", "scoring.stale_after_s: must be > 0, got 0.0"),
        ("[scoring.weights]\nqueue = -1", "scoring.weights.queue: must be >= 0, got -1.0"),
        (
            "[scoring]\noutcome_ewma_alpha = 1.5",
            "scoring.outcome_ewma_alpha: must be in (0, 1], got 1.5",
        ),
        (
            "[scoring]\nprefix_load_factor = 0.5",
            "scoring.prefix_load_factor: must be >= 1, got 0.5",
        ),
        (
            '[logging]\nlevel = "loud"',
            "logging.level: expected one of debug, info, warning, error, critical",
        ),
        (
            '[logging]\nformat = "xml"',
            "logging.format: expected one of auto, json, console, got 'xml'",
        ),
        (
            '[[runtimes]]\nkind = "vllm"\nurl = "127.0.0.1:8000"',
            "runtimes[0].url: expected an http:// or https:// URL, got '127.0.0.1:8000'",
        ),
        (
            '[[runtimes]]\nkind = "vllm"\nurl = "http://a:1"\npoll_interval_s = 0',
            "runtimes[0].poll_interval_s: must be > 0, got 0.0",
        ),
        ('[[gpus]]\nkind = ""', "gpus[0].kind: must name an adapter kind, got an empty string"),
    ],
)
def test_out_of_range_values_are_rejected(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("[::1]:0", ("::1", 0)),
        ("node-a:9464", ("node-a", 9464)),
    ],
)
def test_host_port_parses(text: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(text) == parsed


@pytest.mark.parametrize("text", ["", "8080", ":8080", "host:", "host:http", "host:70000"])
def test_bad_host_port_shows_the_expected_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected HOST:PORT \(e\.g\. 127\.0\.0\.1:8080\)"):
        parse_host_port(text)


# --------------------------------------------------------------------------- documentation


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for field in attrs.fields(cls):
        tp = hints[field.name]
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
        if type(None) in typing.get_args(item):  # an optional table such as [raft]
            item = next(arg for arg in typing.get_args(item) if arg is not type(None))
        if attrs.has(item):
            keys.extend(_dotted_keys(item, f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def test_every_config_key_is_documented() -> None:
    documented = DOCS.read_text(encoding="utf-8")
    missing = [key for key in _dotted_keys(Config) if f"`{key}`" not in documented]
    assert missing == [], f"keys missing from {DOCS}: {missing}"


def test_router_scoring_mode_must_be_local_or_agent(tmp_path: Path) -> None:
    path = tmp_path / "infermesh.toml"
    path.write_text('[router]\nscoring = "remote"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert "router.scoring" in str(info.value)
    assert "local" in str(info.value)


# --------------------------------------------------------------------------- [gossip]


def test_gossip_is_off_by_default_and_needs_nothing() -> None:
    config = load_config(environ={})
    assert config.gossip.enabled is False
    assert config.gossip.profile == "lan"
    assert config.gossip.profile_overrides() == {}


def test_gossip_table_from_file_and_seeds_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "infermesh.toml"
    path.write_text(
        """
        [node]
        labels = { rack = "r7" }

        [gossip]
        enabled = true
        bind = "10.0.0.5:7946"
        key_file = "/etc/infermesh/gossip.key"
        roles = ["gpu"]
        probe_interval_s = 0.2
        """
    )
    env = {"INFERMESH_GOSSIP__SEEDS": "10.0.0.1:7946, seed.example:7946"}
    config = load_config(path, environ=env)
    assert config.gossip.seeds == ["10.0.0.1:7946", "seed.example:7946"]
    assert config.gossip.roles == ["gpu"]
    assert config.node.labels == {"rack": "r7"}
    assert config.gossip.profile_overrides() == {"probe_interval_s": 0.2}


def test_enabled_gossip_without_a_key_tells_how_to_make_one(tmp_path: Path) -> None:
    path = write(tmp_path, '[gossip]\nenabled = true\nbind = "127.0.0.1:7946"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert message.startswith(f"{path}: gossip.key_file: required when gossip is enabled")
    assert "infermesh agent gossip keygen" in message
    assert "gossip.insecure = true" in message


def test_insecure_gossip_needs_no_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[gossip]\nenabled = true\nbind = "127.0.0.1:0"\ninsecure = true\n')
    assert load_config(path, environ={}).gossip.insecure is True


def test_wildcard_bind_needs_an_advertise_address_only_when_enabled(tmp_path: Path) -> None:
    assert load_config(environ={}).gossip.bind == "0.0.0.0:7946"  # default, disabled: fine
    path = write(tmp_path, '[gossip]\nenabled = true\ninsecure = true\nbind = "[::]:7946"\n')
    with pytest.raises(ConfigError, match=r"gossip\.advertise: required when gossip\.bind"):
        load_config(path, environ={})
    path.write_text(
        '[gossip]\nenabled = true\ninsecure = true\nbind = "0.0.0.0:7946"\n'
        'advertise = "10.0.0.5:7946"\n'
    )
    assert load_config(path, environ={}).gossip.advertise == "10.0.0.5:7946"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[gossip]\nbind = "7946"', "gossip.bind: expected HOST:PORT"),
        ('[gossip]\nadvertise = "10.0.0.5:0"', "gossip.advertise: needs a real port"),
        (
            '[gossip]\nadvertise = "0.0.0.0:7946"',
            "gossip.advertise: must be an address others can reach",
        ),
        ('[gossip]\nseeds = ["a:1", "b"]', "gossip.seeds[1]: expected HOST:PORT"),
        ('[gossip]\nseeds = ["a:70000"]', "gossip.seeds[0]: expected HOST:PORT"),
        ('[gossip]\nprofile = "dc"', "gossip.profile: expected one of lan, wan, got 'dc'"),
        ("[gossip]\ninject_loss = 1.0", "gossip.inject_loss: must be in [0, 1), got 1.0"),
        ("[gossip]\ninject_loss = -0.1", "gossip.inject_loss: must be in [0, 1)"),
        ("[gossip]\nsuspicion_mult = -1", "gossip.suspicion_mult: must be >= 0"),
        (
            "[gossip]\nprobe_interval_s = 0.2\nprobe_timeout_s = 0.5",
            "gossip.probe_timeout_s: must not exceed gossip.probe_interval_s (0.2), got 0.5",
        ),
        ('[gossip]\nseeds = "a:1"', "gossip.seeds: expected a list of strings"),
    ],
)
def test_bad_gossip_values_are_rejected(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(f"{path}: {message}")


# --------------------------------------------------------------------------- [raft] and data_dir

VOTERS = '["10.0.0.1:7950", "10.0.0.2:7950", "10.0.0.3:7950"]'


def test_no_raft_table_means_no_raft_and_a_per_node_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(environ={})
    assert config.raft is None
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    default = Config(node=NodeConfig(id="n7")).agent_data_dir()
    assert default == str(tmp_path / "state" / "infermesh" / "n7")
    explicit = load_config(environ={"INFERMESH_AGENT__DATA_DIR": str(tmp_path / "d")})
    assert explicit.agent_data_dir() == str(tmp_path / "d")


def test_a_raft_table_becomes_the_store_options_with_the_password_file_read(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "raft.secret"
    secret.write_text("s3cret\n")
    path = write(
        tmp_path,
        f"""
        [raft]
        listen = "10.0.0.1:7950"
        voters = {VOTERS}
        password_file = "{secret}"
        election_timeout_s = [0.5, 1.5]
        """,
    )
    config = load_config(path, environ={})
    assert config.raft is not None
    options = config.raft.store_options()
    assert options["password"] == "s3cret"
    assert options["voters"] == ["10.0.0.1:7950", "10.0.0.2:7950", "10.0.0.3:7950"]
    assert options["election_timeout_s"] == [0.5, 1.5]
    assert options["snapshot_after_entries"] == 1000


def test_one_voter_needs_no_password_and_defaults_voters_to_listen(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[raft]\nlisten = "127.0.0.1:7950"\n'), environ={})
    assert config.raft is not None
    assert config.raft.store_options()["voters"] == ["127.0.0.1:7950"]
    assert "password" not in config.raft.store_options()


def test_three_voters_without_a_password_name_the_password_file_key(tmp_path: Path) -> None:
    path = write(tmp_path, f'[raft]\nlisten = "10.0.0.1:7950"\nvoters = {VOTERS}\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: raft\.password_file: required with 3"):
        load_config(path, environ={})


def test_a_missing_password_file_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[raft]\nlisten = "10.0.0.1:7950"\nvoters = {VOTERS}\npassword_file = "/nope/secret"\n',
    )
    with pytest.raises(ConfigError, match=r"raft\.password_file: cannot read '/nope/secret'"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ("", "raft.listen", "required"),
        ('listen = "10.0.0.9:7950"\nvoters = ["10.0.0.1:7950"]', "raft.voters", "must include"),
        ('listen = "a:1"\nvoters = ["a:1", "a:1"]\npassword = "x"', "raft.voters", "twice"),
        ('listen = "a:1"\npassword = "x"\npassword_file = "f"', "raft.password_file", "not both"),
        ('listen = "a:1"\nelection_timeout_s = [3.0, 1.0]', "raft.election_timeout_s", "min < max"),
        ('listen = "a:1"\nheartbeat_s = 2.0', "raft.heartbeat_s", "below the election"),
        ('listen = "a:1"\nsnapshot_after_entries = 1', "raft.snapshot_after_entries", ">= 2"),
        ('listen = "a:0"', "raft.listen", "real port"),
        ('listen = "a:1"\nlisen = 3', "raft.lisen", "did you mean 'listen'"),
    ],
)
def test_bad_raft_values_name_the_key(tmp_path: Path, table: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[raft]\n{table}\n"), environ={})
    assert f"{key}: " in str(info.value)
    assert message in str(info.value)


def test_raft_keys_come_from_the_environment_too() -> None:
    config = load_config(
        environ={
            "INFERMESH_RAFT__LISTEN": "10.0.0.1:7950",
            "INFERMESH_RAFT__VOTERS": "10.0.0.1:7950,10.0.0.2:7950,10.0.0.3:7950",
            "INFERMESH_RAFT__PASSWORD": "s3cret",
        }
    )
    assert config.raft is not None
    assert config.raft.voters == ["10.0.0.1:7950", "10.0.0.2:7950", "10.0.0.3:7950"]


def test_the_raft_password_never_shows_in_a_repr() -> None:
    config = load_config(
        environ={"INFERMESH_RAFT__LISTEN": "127.0.0.1:7950", "INFERMESH_RAFT__PASSWORD": "s3cret"}
    )
    assert "s3cret" not in repr(config)


# --------------------------------------------------------------------------- [control]


def test_the_control_api_is_off_without_a_control_table() -> None:
    config = load_config(environ={})
    assert config.control.listen == ""


def test_a_control_table_with_listen_and_tls_files_loads(tmp_path: Path) -> None:
    path = tmp_path / "infermesh.toml"
    path.write_text(
        '[control]\nlisten = "0.0.0.0:7960"\ncert = "n1.pem"\nkey = "n1-key.pem"\nca = "ca.pem"\n'
    )
    config = load_config(path, environ={"INFERMESH_CONTROL__LISTEN": "127.0.0.1:0"})
    assert (config.control.listen, config.control.cert) == ("127.0.0.1:0", "n1.pem")
    assert (config.control.key, config.control.ca) == ("n1-key.pem", "ca.pem")


def test_control_listen_without_tls_files_names_each_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "infermesh.toml"
    path.write_text('[control]\nlisten = "127.0.0.1:7960"\ncert = "n1.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"{path}: control.key: required when control.listen is set" in message
    assert f"{path}: control.ca: required when control.listen is set" in message
    assert "control.cert:" not in message


def test_a_bad_control_listen_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            environ={
                "INFERMESH_CONTROL__LISTEN": "7960",
                "INFERMESH_CONTROL__CERT": "n1.pem",
                "INFERMESH_CONTROL__KEY": "n1-key.pem",
                "INFERMESH_CONTROL__CA": "ca.pem",
            }
        )
    assert "control.listen: expected HOST:PORT" in str(info.value)


# --------------------------------------------------------------------------- [policy]

NODE_TLS = '[control]\ncert = "n4.pem"\nkey = "n4-key.pem"\nca = "ca.pem"\n'


def test_no_policy_table_means_the_agent_does_not_read_from_voters() -> None:
    assert load_config(environ={}).policy is None


def test_a_policy_table_becomes_the_remote_store_options_with_the_node_identity(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, f'[policy]\nvoters = ["10.0.0.1:7960", "10.0.0.2:7960"]\n{NODE_TLS}')
    config = load_config(path, environ={})
    assert config.policy is not None
    assert config.policy.store_options(config.control) == {
        "voters": ["10.0.0.1:7960", "10.0.0.2:7960"],
        "cert": "n4.pem",
        "key": "n4-key.pem",
        "ca": "ca.pem",
        "watch_retry_s": 5.0,
        "resync_s": 30.0,
        "timeout_s": 10.0,
    }


def test_policy_voters_come_from_the_environment_as_a_comma_list(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, NODE_TLS),
        environ={"INFERMESH_POLICY__VOTERS": "10.0.0.1:7960,10.0.0.2:7960"},
    )
    assert config.policy is not None
    assert config.policy.voters == ["10.0.0.1:7960", "10.0.0.2:7960"]


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        ("", "policy.voters", "required in [policy]"),
        ('voters = ["10.0.0.1"]', "policy.voters[0]", "expected HOST:PORT"),
        ('voters = ["10.0.0.1:0"]', "policy.voters[0]", "real port"),
        ('voters = ["a:1", "a:1"]', "policy.voters", "twice"),
        ('voters = ["a:1"]\nresync_s = 0', "policy.resync_s", "> 0"),
        ('voters = ["a:1"]\nvoter = ["a:1"]', "policy.voter", "did you mean 'voters'"),
    ],
)
def test_bad_policy_values_name_the_key(tmp_path: Path, table: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"[policy]\n{table}\n{NODE_TLS}"), environ={})
    assert f"bad.toml: {key}: " in str(info.value)
    assert message in str(info.value)


def test_policy_voters_without_a_node_certificate_name_each_missing_control_key(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, '[policy]\nvoters = ["10.0.0.1:7960"]\n[control]\nca = "ca.pem"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    message = str(info.value)
    assert f"{path}: control.cert: needed by [policy] voters" in message
    assert f"{path}: control.key: needed by [policy] voters" in message
    assert "control.ca:" not in message


def test_policy_and_raft_together_are_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f'[policy]\nvoters = ["10.0.0.1:7960"]\n[raft]\nlisten = "10.0.0.9:7950"\n{NODE_TLS}',
    )
    with pytest.raises(
        ConfigError, match=r"bad\.toml: policy: \[policy\] and \[raft\] cannot both"
    ):
        load_config(path, environ={})

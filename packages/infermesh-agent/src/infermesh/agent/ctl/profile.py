"""Where the CLI connects and with which certificate: flags, then environment variables, then a
profile in the CLI's config file. Reads only that TOML file; never opens a connection.

The file is `$INFERMESH_CLI_CONFIG`, else `$XDG_CONFIG_HOME/infermesh/cli.toml`, else
`~/.config/infermesh/cli.toml`. Relative paths in a profile are relative to the file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from infermesh.agent.ctl.errors import CtlError, ExitCode
from infermesh.core.config import parse_host_port

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_TIMEOUT_S",
    "ENDPOINT_ENV",
    "PROFILE_ENV",
    "ConnectionFlags",
    "ConnectionSettings",
    "Profile",
    "ProfileFile",
    "config_path",
    "load_profile_file",
    "resolve_settings",
]

CONFIG_ENV = "INFERMESH_CLI_CONFIG"
PROFILE_ENV = "INFERMESH_PROFILE"
ENDPOINT_ENV = "INFERMESH_ENDPOINT"
_FILE_ENVS = {"ca": "INFERMESH_CA", "cert": "INFERMESH_CERT", "key": "INFERMESH_KEY"}
_FILE_WHAT = {
    "ca": "CA certificate to trust the agent with",
    "cert": "client certificate",
    "key": "client certificate key",
}
DEFAULT_TIMEOUT_S = 10.0
_PROFILE_KEYS = ("endpoint", "ca", "cert", "key", "timeout")


@attrs.frozen
class Profile:
    """One `[profiles.NAME]` table; paths already made absolute."""

    name: str
    endpoint: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout_s: float | None = None


@attrs.frozen
class ProfileFile:
    path: Path
    default_profile: str | None = None
    profiles: Mapping[str, Profile] = attrs.field(factory=dict)


@attrs.frozen
class ConnectionFlags:
    """What the command line said (None: not given)."""

    endpoint: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    profile: str | None = None
    timeout_s: float | None = None


@attrs.frozen
class ConnectionSettings:
    """Everything needed to open a channel to an agent's Control API."""

    endpoint: str
    ca: str
    cert: str
    key: str
    timeout_s: float = DEFAULT_TIMEOUT_S
    profile: str | None = None


def config_path(env: Mapping[str, str], home: Path) -> tuple[Path, bool]:
    """The profile file's path and whether the user named it explicitly (INFERMESH_CLI_CONFIG)."""
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser(), True
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return base / "infermesh" / "cli.toml", False


def _usage(message: str) -> CtlError:
    return CtlError(message, ExitCode.USAGE)


def _profile(path: Path, name: str, table: Any) -> Profile:
    where = f"{path}: profiles.{name}"
    if not isinstance(table, dict):
        raise _usage(f"{where}: expected a table of {', '.join(_PROFILE_KEYS)}")
    unknown = sorted(set(table) - set(_PROFILE_KEYS))
    if unknown:
        raise _usage(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_PROFILE_KEYS)})")
    values: dict[str, Any] = {}
    for key in ("endpoint", "ca", "cert", "key"):
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise _usage(f"{where}.{key}: expected a non-empty string")
        values[key] = value if key == "endpoint" else str(path.parent / Path(value).expanduser())
    timeout = table.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise _usage(f"{where}.timeout: expected a number of seconds > 0")
        values["timeout_s"] = float(timeout)
    return Profile(name=name, **values)


def load_profile_file(path: Path) -> ProfileFile:
    """Parse the CLI config file; CtlError (usage) naming the file and key for any problem."""
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise _usage(f"cannot read the CLI config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _usage(f"the CLI config {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"default_profile", "profiles"})
    if unknown:
        raise _usage(f"{path}: unknown key {unknown[0]!r} (known: default_profile, profiles)")
    default = document.get("default_profile")
    if default is not None and not isinstance(default, str):
        raise _usage(f"{path}: default_profile: expected a profile name")
    tables = document.get("profiles", {})
    if not isinstance(tables, dict):
        raise _usage(f"{path}: profiles: expected [profiles.NAME] tables")
    profiles = {name: _profile(path, name, table) for name, table in tables.items()}
    if default is not None and default not in profiles:
        raise _usage(f"{path}: default_profile {default!r} has no [profiles.{default}] table")
    return ProfileFile(path=path, default_profile=default, profiles=profiles)


def _chosen_profile(
    flags: ConnectionFlags, env: Mapping[str, str], home: Path
) -> tuple[Profile | None, Path]:
    path, named = config_path(env, home)
    wanted = flags.profile or env.get(PROFILE_ENV) or None
    if not path.exists() and not named:
        if wanted:
            raise _usage(f"no profile {wanted!r}: the CLI config {path} does not exist")
        return None, path
    profile_file = load_profile_file(path)
    name = wanted or profile_file.default_profile
    if name is None:
        return None, path
    if name not in profile_file.profiles:
        known = ", ".join(sorted(profile_file.profiles)) or "none"
        raise _usage(f"no profile {name!r} in {path} (profiles: {known})")
    return profile_file.profiles[name], path


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute())


def resolve_settings(
    flags: ConnectionFlags, env: Mapping[str, str], home: Path
) -> ConnectionSettings:
    """Merge flags > environment > profile; CtlError (usage) saying how to set what is missing."""
    profile, path = _chosen_profile(flags, env, home)

    def pick(key: str, env_name: str) -> str | None:
        flag = getattr(flags, key)
        if flag:
            return str(flag) if key == "endpoint" else _absolute(flag)
        if env.get(env_name):
            return env[env_name] if key == "endpoint" else _absolute(env[env_name])
        value: str | None = getattr(profile, key) if profile is not None else None
        return value

    endpoint = pick("endpoint", ENDPOINT_ENV)
    if endpoint is None:
        raise _usage(
            "no agent endpoint: pass --endpoint HOST:PORT (an agent's control.listen), set "
            f"{ENDPOINT_ENV}, or add endpoint to a profile in {path} (see docs/cli.md)"
        )
    try:
        parse_host_port(endpoint)
    except ValueError as exc:
        raise _usage(f"endpoint: {exc}") from None
    files: dict[str, str] = {}
    for key, env_name in _FILE_ENVS.items():
        value = pick(key, env_name)
        if value is None:
            raise _usage(
                f"no {_FILE_WHAT[key]}: pass --{key} PATH, set {env_name}, or add {key} to a "
                f"profile in {path} (see docs/cli.md)"
            )
        files[key] = value
    timeout_s = flags.timeout_s
    if timeout_s is None:
        timeout_s = profile.timeout_s if profile and profile.timeout_s else DEFAULT_TIMEOUT_S
    return ConnectionSettings(
        endpoint=endpoint,
        ca=files["ca"],
        cert=files["cert"],
        key=files["key"],
        timeout_s=timeout_s,
        profile=profile.name if profile is not None else None,
    )

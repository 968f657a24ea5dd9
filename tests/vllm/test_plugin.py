"""The vllm plugin is found through its entry point and validates its `[[runtimes]]` table."""

from __future__ import annotations

from typing import Any

import pytest

from infermesh.core.config import ConfigError
from infermesh.core.contracts import AdapterContext, RuntimeAdapter, RuntimeControl
from infermesh.core.plugins import PluginHost
from infermesh.vllm.adapter import VllmAdapter


def context(url: str = "http://10.0.0.7:8000", **options: Any) -> AdapterContext:
    return AdapterContext(node="n1", name="gpu0", url=url, options=options)


def test_the_vllm_kind_is_registered_through_the_entry_point() -> None:
    host = PluginHost.load(allow=["vllm"])
    assert host.failures == []
    adapter = host.runtime_adapters()["vllm"](context())
    assert isinstance(adapter, RuntimeAdapter)
    assert isinstance(adapter, RuntimeControl)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://10.0.0.7:8000", "http://10.0.0.7:8000"),
        ("http://10.0.0.7:8000/", "http://10.0.0.7:8000"),
        ("https://vllm.example/v1/", "https://vllm.example"),
    ],
)
def test_targets_use_the_servers_base_url(url: str, base: str) -> None:
    assert VllmAdapter(context(url)).base_url == base


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("10.0.0.7:8000", {}, "must be an http:// or https:// base URL"),
        ("http://h:1", {"api_kee": "x"}, "unknown option(s) api_kee; expected any of: api_key"),
        ("http://h:1", {"control_timeout_s": "soon"}, "options.control_timeout_s must be a float"),
        ("http://h:1", {"control_timeout_s": 0}, "options.control_timeout_s must be > 0"),
        ("http://h:1", {"api_key_env": "INFERMESH_TEST_UNSET"}, "INFERMESH_TEST_UNSET is not set"),
    ],
)
def test_bad_runtime_settings_are_config_errors_naming_the_runtime(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        VllmAdapter(context(url, **options), environ={})
    assert message in str(caught.value)
    assert "runtime 'gpu0' (kind vllm)" in str(caught.value)

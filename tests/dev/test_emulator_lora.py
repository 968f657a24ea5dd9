"""Runtime LoRA loading on the vLLM emulator, over real HTTP, as vLLM serves it.

Also drives the real vLLM adapter's RuntimeControl against it, so the emulator answers what
`infermesh.vllm.control` sends and the adapter reads vLLM's answers the way it will in production.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from infermesh.core.contracts import AdapterContext, RuntimeControl
from infermesh.dev import vllm_emulator
from infermesh.dev.cli import dev_group
from infermesh.dev.profiles import DEFAULT_MODEL
from infermesh.dev.vllm_emulator import EmulatorConfig, EmulatorServer
from infermesh.vllm.adapter import VllmAdapter
from infermesh.vllm.control import VllmControlError, load_lora_adapter

pytestmark = pytest.mark.anyio

StartEmulator = Callable[..., Awaitable[EmulatorServer]]


async def post(url: str, body: Mapping[str, object]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.text()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def chat(server: EmulatorServer, model: str) -> tuple[int, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, text = await post(f"{server.url}/v1/chat/completions", body)
    return status, json.loads(text)


def error_of(text: str) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(text)["error"]
    return error


async def test_a_loaded_adapter_is_listed_and_served_until_it_is_unloaded(
    start: StartEmulator,
) -> None:
    server = await start()
    load = {"lora_name": "sql", "lora_path": "/models/sql-lora"}
    status, text = await post(f"{server.url}/v1/load_lora_adapter", load)
    assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")

    cards = (await get_json(f"{server.url}/v1/models"))["data"]
    assert [card["id"] for card in cards] == [DEFAULT_MODEL, "sql"]
    assert (cards[1]["parent"], cards[1]["root"]) == (DEFAULT_MODEL, "/models/sql-lora")

    status, reply = await chat(server, "sql")
    assert status == 200
    assert reply["model"] == "sql"
    assert reply["usage"]["completion_tokens"] == 2

    status, text = await post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    cards = (await get_json(f"{server.url}/v1/models"))["data"]
    assert [card["id"] for card in cards] == [DEFAULT_MODEL]
    status, reply = await chat(server, "sql")
    assert status == 404
    assert "sql" in reply["error"]["message"]


async def test_duplicate_loads_unknown_unloads_and_missing_fields_get_vllms_errors(
    start: StartEmulator,
) -> None:
    server = await start(loras=("static",))
    status, text = await post(
        f"{server.url}/v1/load_lora_adapter", {"lora_name": "static", "lora_path": "/x"}
    )
    assert status == 400
    assert error_of(text)["message"] == "The lora adapter 'static' has already been loaded."
    assert error_of(text)["type"] == "InvalidUserInput"

    status, text = await post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert status == 404
    assert error_of(text)["message"] == "The lora adapter 'nope' cannot be found."
    assert error_of(text)["type"] == "NotFoundError"

    status, text = await post(f"{server.url}/v1/load_lora_adapter", {"lora_name": "half"})
    assert status == 400
    assert error_of(text)["message"] == "Both 'lora_name' and 'lora_path' must be provided."

    # An adapter given on the command line unloads like a runtime one, as in vLLM.
    status, _ = await post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "static"})
    assert status == 200


async def test_loads_beyond_max_loras_are_refused_and_the_limit_is_on_the_metrics_page(
    start: StartEmulator,
) -> None:
    server = await start(max_loras=2)
    for name in ("a", "b"):
        status, _ = await post(
            f"{server.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/{name}"}
        )
        assert status == 200
    status, text = await post(
        f"{server.url}/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/c"}
    )
    assert status == 400
    assert error_of(text) == {
        "message": "No free adapter slots.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
    # Unloading frees a slot.
    await post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "a"})
    status, _ = await post(
        f"{server.url}/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "/c"}
    )
    assert status == 200

    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/metrics") as resp:
        page = await resp.text()
    (family,) = [
        f for f in text_string_to_metric_families(page) if f.name.endswith("lora_requests_info")
    ]
    assert [sample.labels["max_lora"] for sample in family.samples] == ["2"]


async def test_without_runtime_lora_updating_the_routes_are_404_and_control_says_why(
    start: StartEmulator,
) -> None:
    server = await start(runtime_lora_updating=False)
    status, text = await post(
        f"{server.url}/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/a"}
    )
    assert (status, json.loads(text)) == (404, {"detail": "Not Found"})
    status, _ = await post(f"{server.url}/v1/unload_lora_adapter", {"lora_name": "a"})
    assert status == 404

    async with aiohttp.ClientSession() as session:
        with pytest.raises(VllmControlError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            await load_lora_adapter(session, server.url, "a", "/a", timeout_s=5.0)


async def test_the_vllm_adapters_runtime_control_loads_and_unloads_on_the_emulator(
    start: StartEmulator,
) -> None:
    server = await start()
    context = AdapterContext(
        node="n1", name="emulated", url=f"{server.url}/v1", poll_interval_s=0.05, timeout_s=1.0
    )
    adapter = VllmAdapter(context, environ={})
    assert isinstance(adapter, RuntimeControl)
    try:
        await adapter.load("sql", "/models/sql-lora")
        cards = (await get_json(f"{server.url}/v1/models"))["data"]
        assert [(card["id"], card["root"]) for card in cards[1:]] == [("sql", "/models/sql-lora")]
        await adapter.warm("sql")

        with pytest.raises(VllmControlError, match="HTTP 400: The lora adapter 'sql' has already"):
            await adapter.load("sql", "/models/sql-lora")

        await adapter.unload("sql")
        cards = (await get_json(f"{server.url}/v1/models"))["data"]
        assert [card["id"] for card in cards] == [DEFAULT_MODEL]
        with pytest.raises(VllmControlError, match="HTTP 404: The lora adapter 'sql' cannot be"):
            await adapter.unload("sql")
    finally:
        await adapter.aclose()


@pytest.mark.parametrize(
    ("args", "env", "max_loras", "runtime"),
    [
        ([], {}, 4, True),
        (["--max-loras", "2", "--no-runtime-lora"], {}, 2, False),
        ([], {"INFERMESH_DEV_NO_RUNTIME_LORA": "1"}, 4, False),
    ],
)
def test_the_vllm_command_passes_the_lora_flags_to_the_emulator(
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    max_loras: int,
    runtime: bool,
) -> None:
    served: list[EmulatorConfig] = []
    monkeypatch.setattr(
        vllm_emulator, "run_emulator", lambda config, host, port: served.append(config)
    )
    result = CliRunner().invoke(dev_group, ["vllm", "--port", "1", *args], env=env)
    assert result.exit_code == 0, result.output
    assert [(c.max_loras, c.runtime_lora_updating) for c in served] == [(max_loras, runtime)]


def test_max_loras_below_one_is_a_usage_error() -> None:
    result = CliRunner().invoke(dev_group, ["vllm", "--port", "1", "--max-loras", "0"])
    assert result.exit_code == 2
    assert "--max-loras" in result.output

"""vLLM lifecycle calls: load and unload LoRA adapters, warm a model with a 1-token completion.

Thin HTTP calls over a session the caller owns; a failure raises VllmControlError carrying the
runtime's own message. Never retries and never changes adapter state.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

__all__ = ["VllmControlError", "load_lora_adapter", "unload_lora_adapter", "warm_model"]

_LORA_ROUTES_OFF = (
    " (the LoRA routes are missing: start vLLM with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
)


class VllmControlError(Exception):
    """A control call failed; the message names the server, the operation and vLLM's answer."""


async def load_lora_adapter(
    session: aiohttp.ClientSession, base_url: str, name: str, path: str, timeout_s: float
) -> None:
    """POST /v1/load_lora_adapter: serve the adapter at `path` as model `name`."""
    body = {"lora_name": name, "lora_path": path}
    what = f"load LoRA adapter {name!r} from {path!r}"
    await _post(session, base_url, "/v1/load_lora_adapter", body, what, timeout_s, lora=True)


async def unload_lora_adapter(
    session: aiohttp.ClientSession, base_url: str, name: str, timeout_s: float
) -> None:
    """POST /v1/unload_lora_adapter: stop serving adapter `name`."""
    what = f"unload LoRA adapter {name!r}"
    await _post(
        session, base_url, "/v1/unload_lora_adapter", {"lora_name": name}, what, timeout_s, True
    )


async def warm_model(
    session: aiohttp.ClientSession, base_url: str, model: str, prompt: str, timeout_s: float
) -> None:
    """A 1-token completion, so the first real request does not pay for cold caches."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
    await _post(session, base_url, "/v1/completions", body, f"warm model {model!r}", timeout_s)


async def _post(
    session: aiohttp.ClientSession,
    base_url: str,
    path: str,
    body: dict[str, Any],
    what: str,
    timeout_s: float,
    lora: bool = False,
) -> None:
    url = base_url + path
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            text = await response.text(errors="replace")
            status = response.status
    except TimeoutError:
        raise VllmControlError(
            f"vLLM at {base_url} could not {what}: no answer from {url} in {timeout_s:g}s"
        ) from None
    except aiohttp.ClientError as exc:
        raise VllmControlError(f"vLLM at {base_url} could not {what}: {url}: {exc}") from None
    if 200 <= status < 300:
        return
    message = runtime_message(text)
    hint = _LORA_ROUTES_OFF if lora and status == 404 and message == "Not Found" else ""
    raise VllmControlError(f"vLLM at {base_url} could not {what}: HTTP {status}: {message}{hint}")


def runtime_message(text: str) -> str:
    """The human message in a vLLM / FastAPI error body, or the body itself (shortened)."""
    try:
        document: Any = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if isinstance(document.get(key), str):
                return str(document[key])
    text = text.strip() or "(empty body)"
    return text if len(text) <= 500 else text[:497] + "..."

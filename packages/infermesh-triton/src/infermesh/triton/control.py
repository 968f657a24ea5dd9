"""Triton lifecycle calls: load and unload through the repository API, warm with one inference.

Thin HTTP calls over a session the caller owns; a failure raises TritonControlError carrying
Triton's own message and the HTTP status (`HTTP 400: ...`). Never retries. The warm-up request
is the configured one, or one built from the model's metadata (zeros of each input).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp

__all__ = [
    "TritonControlError",
    "load_model",
    "load_parameters",
    "unload_model",
    "warm_model",
    "warmup_request",
]

REPOSITORY_SOURCES = ("", "repository")
"""`source` values that load the model from the server's own model repository."""


class TritonControlError(Exception):
    """A control call failed; the message names the server, the operation and Triton's answer."""


def load_parameters(model: str, source: str) -> dict[str, Any]:
    """The load request body for `source`: empty or `repository` (load from the server's
    repository), or a JSON model configuration passed as Triton's `parameters.config`."""
    text = source.strip()
    if text in REPOSITORY_SOURCES:
        return {}
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except ValueError as exc:
            raise TritonControlError(
                f"cannot load {model!r}: source looks like a JSON model configuration but is "
                f"not valid JSON ({exc})"
            ) from None
        if not isinstance(config, dict):
            raise TritonControlError(
                f"cannot load {model!r}: the model configuration must be a JSON object"
            )
        return {"parameters": {"config": json.dumps(config, separators=(",", ":"))}}
    raise TritonControlError(
        f"cannot load {model!r} from {source!r}: Triton loads models from its own repository; "
        "use source 'repository' (or empty), or a JSON model configuration {...}"
    )


async def load_model(
    session: aiohttp.ClientSession, base_url: str, model: str, source: str, timeout_s: float
) -> None:
    """POST /v2/repository/models/{model}/load; returns when Triton reports it loaded."""
    body = load_parameters(model, source)
    path = f"/v2/repository/models/{model}/load"
    await _post(session, base_url, path, body, f"load model {model!r}", timeout_s)


async def unload_model(
    session: aiohttp.ClientSession, base_url: str, model: str, timeout_s: float
) -> None:
    """POST /v2/repository/models/{model}/unload."""
    path = f"/v2/repository/models/{model}/unload"
    await _post(session, base_url, path, {}, f"unload model {model!r}", timeout_s)


def warmup_request(metadata: Mapping[str, Any], model: str) -> dict[str, Any]:
    """A KServe v2 infer request of zeros (`"0"` for BYTES) for every input in `metadata`;
    variable dimensions (-1) become 1."""
    inputs = metadata.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TritonControlError(
            f"cannot warm {model!r}: its metadata lists no inputs; set options.warmup.{model} "
            "to the infer request to send"
        )
    request_inputs = []
    for entry in inputs:
        if not isinstance(entry, dict):
            raise TritonControlError(f"cannot warm {model!r}: malformed input in its metadata")
        name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
        if (
            not isinstance(name, str)
            or not isinstance(datatype, str)
            or not isinstance(shape, list)
        ):
            raise TritonControlError(
                f"cannot warm {model!r}: input metadata needs name, datatype and shape"
            )
        dims = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in shape]
        count = 1
        for dim in dims:
            count *= dim
        zero: Any = "0" if datatype == "BYTES" else False if datatype == "BOOL" else 0
        request_inputs.append(
            {"name": name, "datatype": datatype, "shape": dims, "data": [zero] * count}
        )
    return {"id": "infermesh-warmup", "inputs": request_inputs}


async def warm_model(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    request: Mapping[str, Any] | None,
    timeout_s: float,
) -> None:
    """Send one inference to `model`: `request`, or zeros built from the model's metadata."""
    if request is None:
        metadata = await _get_json(session, base_url, f"/v2/models/{model}", model, timeout_s)
        request = warmup_request(metadata, model)
    path = f"/v2/models/{model}/infer"
    await _post(session, base_url, path, dict(request), f"warm model {model!r}", timeout_s)


async def _get_json(
    session: aiohttp.ClientSession, base_url: str, path: str, model: str, timeout_s: float
) -> dict[str, Any]:
    url = base_url + path
    what = f"read the metadata of {model!r}"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            text = await response.text(errors="replace")
            status = response.status
    except TimeoutError:
        raise TritonControlError(
            f"Triton at {base_url} could not {what}: no answer from {url} in {timeout_s:g}s"
        ) from None
    except aiohttp.ClientError as exc:
        raise TritonControlError(f"Triton at {base_url} could not {what}: {url}: {exc}") from None
    if status != 200:
        raise TritonControlError(
            f"Triton at {base_url} could not {what}: HTTP {status}: {triton_message(text)}"
        )
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise TritonControlError(f"Triton at {base_url} could not {what}: {url} is not JSON")
    return document


async def _post(
    session: aiohttp.ClientSession,
    base_url: str,
    path: str,
    body: Mapping[str, Any],
    what: str,
    timeout_s: float,
) -> None:
    url = base_url + path
    try:
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as response:
            text = await response.text(errors="replace")
            status = response.status
    except TimeoutError:
        raise TritonControlError(
            f"Triton at {base_url} could not {what}: no answer from {url} in {timeout_s:g}s"
        ) from None
    except aiohttp.ClientError as exc:
        raise TritonControlError(f"Triton at {base_url} could not {what}: {url}: {exc}") from None
    if 200 <= status < 300:
        return
    raise TritonControlError(
        f"Triton at {base_url} could not {what}: HTTP {status}: {triton_message(text)}"
    )


def triton_message(text: str) -> str:
    """The message of a Triton error body `{"error": "..."}`, or the body itself (shortened)."""
    try:
        document: Any = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    text = text.strip() or "(empty body)"
    return text if len(text) <= 500 else text[:497] + "..."

"""The emulator's LoRA adapters: which are loaded, from where, and vLLM's refusals.

Sans-I/O so the rules (and vLLM's exact messages) are testable without a server; the aiohttp
routes in `vllm_emulator` only translate an `ApiError` into vLLM's error response.

vLLM's messages and statuses (serving_models.py): a missing name or path and a duplicate name
are 400 `InvalidUserInput`; an unknown name on unload is 404 `NotFoundError`; an engine that
cannot take the adapter answers 400 `BadRequestError` with the engine's message. Real vLLM's
default LRU adapter cache evicts instead of refusing once `--max-loras` is reached; the emulator
refuses with the fixed-capacity manager's "No free adapter slots." so a control plane sees the
limit instead of an adapter silently going cold.
"""

from __future__ import annotations

from infermesh.dev.openai_protocol import ApiError

__all__ = ["LoraRegistry"]

_INVALID = "InvalidUserInput"


class LoraRegistry:
    """Loaded adapters in load order, name -> path, at most `max_loras` of them."""

    def __init__(self, base_model: str, max_loras: int) -> None:
        self._base_model = base_model
        self._max_loras = max_loras
        self._paths: dict[str, str] = {}

    @property
    def paths(self) -> dict[str, str]:
        """A copy: adapter name -> the path it was loaded from (its `root` in /v1/models)."""
        return dict(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def load(self, name: object, path: object) -> None:
        """Serve `name` from `path`; raises ApiError with vLLM's answer when it cannot."""
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", error_type=_INVALID
            )
        if name == self._base_model or name in self._paths:
            raise ApiError(
                400, f"The lora adapter '{name}' has already been loaded.", error_type=_INVALID
            )
        if len(self._paths) >= self._max_loras:
            raise ApiError(400, "No free adapter slots.", error_type="BadRequestError")
        self._paths[name] = path

    def unload(self, name: object) -> None:
        """Stop serving `name`; raises ApiError with vLLM's answer when it is not loaded."""
        if not isinstance(name, str) or not name:
            raise ApiError(
                400,
                "either 'lora_name' and 'lora_int_id' needs to be provided.",
                error_type=_INVALID,
            )
        if name not in self._paths:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.")
        del self._paths[name]

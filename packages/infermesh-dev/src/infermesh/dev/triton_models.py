"""The Triton emulator's models and repository: deterministic models, load state, statistics.

Sans-I/O: what each model computes, which models are loaded, what the repository index says and
the per model/version counters behind the metrics page. Refusals raise `KServeError` with
Triton's messages. Never sleeps or reads a clock (the shell passes durations in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import attrs

from infermesh.dev.triton_tensors import KServeError, Tensor, Value, invalid

__all__ = [
    "CATALOGUE",
    "ModelSpec",
    "ModelStats",
    "Repository",
    "TensorSpec",
]


@attrs.frozen
class TensorSpec:
    """One input or output of a model: name, datatype and shape (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


Compute = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


@attrs.frozen
class ModelSpec:
    """A model the emulated repository holds: its signature, versions and what it computes."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    compute: Compute
    versions: tuple[str, ...] = ("1",)
    platform: str = "emulated"
    max_batch_size: int = 8
    memory_bytes: int = 512 * 1024 * 1024
    """GPU memory the loaded model occupies (shown in nv_gpu_memory_used_bytes)."""

    def metadata(self, version: str | None = None) -> dict[str, object]:
        return {
            "name": self.name,
            "versions": [version] if version else list(self.versions),
            "platform": self.platform,
            "inputs": [spec.metadata() for spec in self.inputs],
            "outputs": [spec.metadata() for spec in self.outputs],
        }

    def batch_size(self, inputs: Mapping[str, Tensor]) -> int:
        """Inferences in one request: the first dimension when the model batches, else 1."""
        if self.max_batch_size <= 0:
            return 1
        first = next(iter(inputs.values()))
        return first.shape[0] if first.shape else 1

    def check_inputs(self, tensors: Sequence[Tensor]) -> dict[str, Tensor]:
        """The request's inputs by name, checked against the signature (Triton's messages)."""
        by_name: dict[str, Tensor] = {}
        expected = {spec.name: spec for spec in self.inputs}
        for tensor in tensors:
            spec = expected.get(tensor.name)
            if spec is None:
                raise invalid(f"unexpected inference input '{tensor.name}' for model '{self.name}'")
            if tensor.name in by_name:
                raise invalid(f"input '{tensor.name}' given more than once")
            if tensor.datatype != spec.datatype:
                raise invalid(
                    f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but "
                    f"model '{self.name}' expects '{spec.datatype}'"
                )
            if len(tensor.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, tensor.shape, strict=True)
            ):
                raise invalid(
                    f"unexpected shape for input '{tensor.name}' for model '{self.name}'. "
                    f"Expected {list(spec.shape)}, got {list(tensor.shape)}"
                )
            if self.max_batch_size > 0 and tensor.shape and tensor.shape[0] > self.max_batch_size:
                raise invalid(
                    f"inference request batch-size must be <= {self.max_batch_size} for "
                    f"'{self.name}'"
                )
            by_name[tensor.name] = tensor
        missing = [name for name in expected if name not in by_name]
        if missing:
            raise invalid(
                f"expected {len(expected)} inputs but got {len(by_name)} inputs for model "
                f"'{self.name}'. Got input(s) {sorted(by_name)}, but missing required input(s) "
                f"{missing}. Please provide all required input(s)."
            )
        shapes = {tensor.shape for tensor in by_name.values()}
        if len(shapes) > 1:
            raise invalid(f"inputs of model '{self.name}' must all have the same shape")
        return by_name

    def check_outputs(self, requested: Sequence[str]) -> tuple[str, ...]:
        """The outputs to return: those asked for (checked), or all of them."""
        known = [spec.name for spec in self.outputs]
        for name in requested:
            if name not in known:
                raise invalid(f"unexpected inference output '{name}' for model '{self.name}'")
        return tuple(requested) if requested else tuple(known)


def _numbers(tensor: Tensor) -> list[int]:
    if tensor.datatype == "BYTES":
        try:
            return [int(v.decode() if isinstance(v, bytes) else v) for v in tensor.data]
        except ValueError:
            raise invalid(f"input '{tensor.name}' must hold decimal integers as strings") from None
    return [int(v) for v in tensor.data]


def _add_sub(inputs: Mapping[str, Tensor], datatype: str) -> dict[str, Tensor]:
    first, second = inputs["INPUT0"], inputs["INPUT1"]
    a, b = _numbers(first), _numbers(second)
    sums = [x + y for x, y in zip(a, b, strict=True)]
    diffs = [x - y for x, y in zip(a, b, strict=True)]

    def tensor(name: str, values: list[int]) -> Tensor:
        data: tuple[Value, ...]
        if datatype == "BYTES":
            data = tuple(str(v).encode() for v in values)
        else:
            data = tuple((v + 2**31) % 2**32 - 2**31 for v in values)  # INT32 wraps around
        return Tensor(name, datatype, first.shape, data)

    return {"OUTPUT0": tensor("OUTPUT0", sums), "OUTPUT1": tensor("OUTPUT1", diffs)}


def _identity(inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
    tensor = inputs["INPUT0"]
    return {"OUTPUT0": attrs.evolve(tensor, name="OUTPUT0")}


def _pair(datatype: str) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("INPUT0", datatype, (-1, 16)),
        TensorSpec("INPUT1", datatype, (-1, 16)),
    )


def _pair_out(datatype: str) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec("OUTPUT0", datatype, (-1, 16)),
        TensorSpec("OUTPUT1", datatype, (-1, 16)),
    )


CATALOGUE: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="simple",
            inputs=_pair("INT32"),
            outputs=_pair_out("INT32"),
            compute=lambda inputs: _add_sub(inputs, "INT32"),
        ),
        ModelSpec(
            name="simple_string",
            inputs=_pair("BYTES"),
            outputs=_pair_out("BYTES"),
            compute=lambda inputs: _add_sub(inputs, "BYTES"),
        ),
        ModelSpec(
            name="identity_fp32",
            inputs=(TensorSpec("INPUT0", "FP32", (-1, -1)),),
            outputs=(TensorSpec("OUTPUT0", "FP32", (-1, -1)),),
            compute=_identity,
            max_batch_size=0,
            memory_bytes=128 * 1024 * 1024,
        ),
    )
}
"""The emulated repository's models, after Triton's examples: `simple` (INT32 sum and
difference of two [batch, 16] tensors), `simple_string` (the same on decimal strings) and
`identity_fp32` (returns its FP32 input)."""


FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")
"""The `reason` label values of nv_inference_request_failure."""


@attrs.define
class ModelStats:
    """Triton's per model/version counters (µs durations, cumulative since the load)."""

    success: int = 0
    failure: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(FAILURE_REASONS, 0))
    inference_count: int = 0
    exec_count: int = 0
    pending: int = 0
    executing: int = 0
    """Requests holding an instance now (the emulator's own count; Triton exports none)."""
    request_us: int = 0
    queue_us: int = 0
    compute_input_us: int = 0
    compute_infer_us: int = 0
    compute_output_us: int = 0


READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


@attrs.define
class _Entry:
    spec: ModelSpec
    state: str = ""  # "" never loaded, READY, LOADING, UNAVAILABLE
    reason: str = ""
    stats: dict[str, ModelStats] = attrs.field(factory=dict)


class Repository:
    """The emulated model repository: which models exist, which are loaded, and their stats.

    `explicit` mirrors Triton's `--model-control-mode=explicit`: without it, load and unload are
    refused. `startup` names the models loaded at start (all of them when None).
    """

    def __init__(
        self,
        models: Mapping[str, ModelSpec] | None = None,
        *,
        startup: Sequence[str] | None = None,
        explicit: bool = True,
    ) -> None:
        catalogue = dict(CATALOGUE if models is None else models)
        self.explicit = explicit
        self._entries = {name: _Entry(spec) for name, spec in sorted(catalogue.items())}
        for name in catalogue if startup is None else startup:
            if name not in self._entries:
                raise ValueError(
                    f"unknown model {name!r}; the repository holds: {', '.join(self._entries)}"
                )
            self._mark_ready(self._entries[name])

    # ------------------------------------------------------------------ queries

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def ready_models(self) -> list[ModelSpec]:
        return [entry.spec for entry in self._entries.values() if entry.state == READY]

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """`POST /v2/repository/index`: one row per version ever loaded, name only otherwise."""
        rows: list[dict[str, str]] = []
        for name, entry in self._entries.items():
            if ready_only and entry.state != READY:
                continue
            if not entry.state:
                rows.append({"name": name})
                continue
            for version in entry.spec.versions:
                rows.append(
                    {"name": name, "version": version, "state": entry.state, "reason": entry.reason}
                )
        return rows

    def resolve(self, name: str, version: str | None) -> tuple[ModelSpec, str]:
        """(model, version) of a ready model; KServeError 404/503 with Triton's text otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            raise KServeError(404, f"Request for unknown model: '{name}' is not found")
        if entry.state != READY:
            raise KServeError(503, f"Request for unknown model: '{name}' has no available versions")
        if version:
            if version not in entry.spec.versions:
                raise KServeError(
                    404, f"Request for unknown model: '{name}' version {version} is not found"
                )
            return entry.spec, version
        return entry.spec, entry.spec.versions[-1]

    def spec(self, name: str) -> ModelSpec:
        """A model's spec, loaded or not (metadata of an unloaded model is still refused)."""
        entry = self._entries.get(name)
        if entry is None:
            raise KServeError(404, f"Request for unknown model: '{name}' is not found")
        return entry.spec

    def is_ready(self, name: str, version: str | None = None) -> bool:
        try:
            self.resolve(name, version)
        except KServeError:
            return False
        return True

    def stats(self) -> dict[tuple[str, str], ModelStats]:
        """Counters of every loaded model version (a model's series vanish when unloaded)."""
        return {
            (name, version): stats
            for name, entry in self._entries.items()
            if entry.state == READY
            for version, stats in entry.stats.items()
        }

    def stats_for(self, name: str, version: str) -> ModelStats:
        return self._entries[name].stats[version]

    def loaded_memory_bytes(self) -> int:
        return sum(spec.memory_bytes for spec in self.ready_models())

    # ------------------------------------------------------------------ load / unload

    def begin_load(self, name: str) -> ModelSpec:
        """Start loading `name` (state LOADING); the shell waits, then calls `finish_load`."""
        self._check_control("load")
        entry = self._entries.get(name)
        if entry is None:
            raise invalid(f"failed to load '{name}', failed to poll from model repository")
        if entry.state != READY:  # a reload of a ready model keeps serving while it loads
            entry.state, entry.reason = LOADING, ""
        return entry.spec

    def finish_load(self, name: str) -> None:
        entry = self._entries[name]
        if entry.state == LOADING:  # not if it was unloaded while loading
            self._mark_ready(entry)

    def unload(self, name: str) -> None:
        """Unload `name`: state UNAVAILABLE, reason `unloaded`; its metrics series vanish."""
        self._check_control("unload")
        entry = self._entries.get(name)
        if entry is None:
            raise invalid(f"failed to unload '{name}', no version is available")
        if entry.state in ("", UNAVAILABLE):
            return  # Triton answers 200 for a model that is not loaded
        entry.state, entry.reason = UNAVAILABLE, "unloaded"
        entry.stats.clear()

    def _check_control(self, what: str) -> None:
        if not self.explicit:
            raise KServeError(
                503,
                f"explicit model {what} is not allowed: start the server with "
                "--model-control-mode=explicit",
            )

    @staticmethod
    def _mark_ready(entry: _Entry) -> None:
        entry.state, entry.reason = READY, ""
        entry.stats = {version: ModelStats() for version in entry.spec.versions}

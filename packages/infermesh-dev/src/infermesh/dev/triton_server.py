"""The Triton emulator's server core, shared by its HTTP and gRPC front ends.

Runs inferences through a per-model queue (one execution at a time per model instance, so the
pending count and queue time are real), times them from the GPU profile, records Triton's
statistics, and loads and unloads models. Holds no sockets: the front ends only translate.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import attrs

from infermesh.dev.profiles import GpuProfile, get_profile
from infermesh.dev.triton_metrics import GpuReading, render_metrics
from infermesh.dev.triton_models import ModelSpec, Repository
from infermesh.dev.triton_tensors import KServeError, Tensor, invalid

__all__ = [
    "EMULATED_TRITON_VERSION",
    "EXTENSIONS",
    "InferResult",
    "TritonCore",
    "TritonEmulatorConfig",
]

EMULATED_TRITON_VERSION = "2.73.0"
EXTENSIONS = ("model_repository", "model_configuration", "binary_tensor_data", "parameters")

# Device memory and power of each profile's card; "instant" has no GPU (a CPU-only server).
_GPU_MEMORY_GIB = {"h100": 80, "a100": 80, "a10": 24, "l4": 24}
_POWER_LIMIT_W = {"h100": 700.0, "a100": 400.0, "a10": 150.0, "l4": 72.0}
_BASE_MEMORY_BYTES = 1024 * 1024 * 1024  # the CUDA context and Triton's own buffers


@attrs.frozen
class TritonEmulatorConfig:
    """What `infermesh dev triton` serves and how fast."""

    models: tuple[str, ...] | None = None
    """Models loaded at start (Triton's `--load-model`); None loads every model."""
    profile: GpuProfile = attrs.field(factory=lambda: get_profile("h100"))
    """Execution speed: one execution of a batch of n takes the profile's step time for n."""
    explicit: bool = True
    """`--model-control-mode=explicit`: load and unload allowed (refused otherwise)."""
    load_s: float = 0.05
    """How long loading a model takes (the index shows LOADING meanwhile)."""
    instance_count: int = 1
    """Executions of one model that run at once; further requests wait (pending)."""
    gpu_uuid: str = ""
    """The emulated GPU's UUID; derived from `seed` when empty."""
    seed: int = 0

    def gpu_id(self) -> str:
        if self.gpu_uuid:
            return self.gpu_uuid
        return f"GPU-{uuid.uuid5(uuid.NAMESPACE_OID, f'infermesh-triton-{self.seed}')}"


@attrs.frozen
class InferResult:
    """A finished inference: which model version ran and its output tensors."""

    model: ModelSpec
    version: str
    outputs: tuple[Tensor, ...]


class TritonCore:
    """State and behaviour of one emulated Triton server."""

    def __init__(
        self, config: TritonEmulatorConfig, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.repository = Repository(startup=config.models, explicit=config.explicit)
        self.live = True
        self.ready = True
        """Server readiness (`/v2/health/ready`); tests may set it False."""
        self.slowdown = 1.0
        """Multiplies execution time: 2.0 makes the GPU half as fast (e.g. a throttled GPU)."""
        self._clock = clock
        self._started = clock()
        self._instances: dict[str, asyncio.Semaphore] = {}
        self._busy_s = 0.0
        self._busy_seen: tuple[float, float] = (self._started, 0.0)
        self._utilization = 0.0
        self._energy_j = 0.0
        self._gpu = config.profile.name in _GPU_MEMORY_GIB

    # ------------------------------------------------------------------ inference

    async def infer(
        self,
        name: str,
        version: str | None,
        tensors: Sequence[Tensor],
        requested: Sequence[str],
    ) -> InferResult:
        """Run one request; KServeError for an unknown or unloaded model or bad inputs."""
        spec, chosen = self.repository.resolve(name, version)
        stats = self.repository.stats_for(spec.name, chosen)
        arrived = self._clock()
        try:
            inputs = spec.check_inputs(tensors)
            outputs_wanted = spec.check_outputs(requested)
        except KServeError:
            stats.failure["OTHER"] += 1
            raise
        decoded = self._clock()
        instances = self._instances.setdefault(
            spec.name, asyncio.Semaphore(self.config.instance_count)
        )
        stats.pending += 1
        try:
            await instances.acquire()
        except asyncio.CancelledError:
            stats.failure["CANCELED"] += 1
            raise
        finally:
            stats.pending -= 1
        stats.executing += 1
        try:
            started = self._clock()
            batch = spec.batch_size(inputs)
            exec_s = self.config.profile.step_s(batch, 0) * self.slowdown
            if exec_s > 0:
                try:
                    await asyncio.sleep(exec_s)
                except asyncio.CancelledError:  # the client went away mid-execution
                    stats.failure["CANCELED"] += 1
                    raise
            try:
                computed = spec.compute(inputs)
            except KServeError:
                stats.failure["BACKEND"] += 1
                raise
            executed = self._clock()
            outputs = tuple(computed[output] for output in outputs_wanted)
        finally:
            stats.executing -= 1
            instances.release()
        done = self._clock()
        self._busy_s += executed - started
        stats.success += 1
        stats.inference_count += batch
        stats.exec_count += 1
        stats.queue_us += _us(started - decoded)
        stats.compute_input_us += _us(decoded - arrived)
        stats.compute_infer_us += _us(executed - started)
        stats.compute_output_us += _us(done - executed)
        stats.request_us += _us(done - arrived)
        return InferResult(model=spec, version=chosen, outputs=outputs)

    def count_bad_request(self, name: str, version: str | None) -> None:
        """A request to `name` whose tensors could not be read: a failure (reason OTHER) of
        that model, as Triton counts it, when the model is ready."""
        try:
            spec, chosen = self.repository.resolve(name, version)
        except KServeError:
            return
        self.repository.stats_for(spec.name, chosen).failure["OTHER"] += 1

    # ------------------------------------------------------------------ repository

    async def load(self, name: str, parameters: Mapping[str, object] | None = None) -> None:
        """Load (or reload) `name`; returns when it is ready, like Triton's load call."""
        config = (parameters or {}).get("config")
        if config is not None:
            try:
                parsed = json.loads(config) if isinstance(config, str) else None
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise invalid(
                    f"failed to load '{name}': parameter 'config' must be a string holding the "
                    "model configuration as a JSON object"
                )
        self.repository.begin_load(name)
        if self.config.load_s > 0:
            await asyncio.sleep(self.config.load_s)
        self.repository.finish_load(name)

    def unload(self, name: str) -> None:
        self.repository.unload(name)

    # ------------------------------------------------------------------ metrics

    def gpu_reading(self) -> GpuReading | None:
        """The GPU as DCGM would report it now (None for a CPU-only profile)."""
        if not self._gpu:
            return None
        now = self._clock()
        seen_at, seen_busy = self._busy_seen
        if now - seen_at >= 0.5:  # Triton refreshes GPU metrics every --metrics-interval-ms
            self._utilization = min(1.0, (self._busy_s - seen_busy) / (now - seen_at))
            self._busy_seen = (now, self._busy_s)
        profile = self.config.profile.name
        limit_w = _POWER_LIMIT_W[profile]
        power_w = round(limit_w * (0.12 + 0.8 * self._utilization), 3)
        self._energy_j = round(power_w * (now - self._started), 3)
        return GpuReading(
            uuid=self.config.gpu_id(),
            utilization=round(self._utilization, 4),
            memory_total_bytes=_GPU_MEMORY_GIB[profile] * 1024**3,
            memory_used_bytes=_BASE_MEMORY_BYTES + self.repository.loaded_memory_bytes(),
            power_w=power_w,
            power_limit_w=limit_w,
            energy_j=self._energy_j,
        )

    def metrics_text(self) -> str:
        gpu = self.gpu_reading()
        return render_metrics(self.repository.stats(), () if gpu is None else (gpu,))


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))

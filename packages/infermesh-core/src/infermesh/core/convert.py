"""Conversions between the attrs data model and the `infermesh.v1` protobuf messages.

Pure functions, both directions, lossless for every field the wire carries. Malformed wire
input raises ValueError with a message naming the field. Never does I/O or holds state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from infermesh.core.model import (
    GpuKey,
    GpuState,
    GpuStateDelta,
    Labels,
    ModelState,
    ModelStateDelta,
    RequestFeatures,
    SloClass,
    TargetKey,
)
from infermesh.core.proto import scoring_pb2, types_pb2

__all__ = [
    "gpu_delta_from_pb",
    "gpu_delta_to_pb",
    "gpu_key_from_pb",
    "gpu_key_to_pb",
    "gpu_snapshot_delta_pb",
    "gpu_state_from_pb",
    "gpu_state_to_pb",
    "labels_from_pb",
    "labels_to_pb",
    "model_delta_from_pb",
    "model_delta_to_pb",
    "model_snapshot_delta_pb",
    "model_state_from_pb",
    "model_state_to_pb",
    "request_features_from_pb",
    "request_features_to_pb",
    "slo_class_from_pb",
    "slo_class_to_pb",
    "target_key_from_pb",
    "target_key_to_pb",
]

# ModelState fields carried by ModelStateFields; `None`-able ones are proto3 `optional`.
_MODEL_FIELDS: tuple[str, ...] = tuple(
    f.name for f in attrs.fields(ModelState) if f.name not in ("key", "version")
)
_MODEL_OPTIONAL = frozenset({"prefix_cache_hit_rate", "ttft_s", "itl_s", "e2e_s", "max_num_seqs"})
_GPU_FIELDS: tuple[str, ...] = tuple(
    f.name for f in attrs.fields(GpuState) if f.name not in ("key", "version")
)

_SLO_TO_PB = {
    SloClass.LATENCY: types_pb2.SLO_CLASS_LATENCY,
    SloClass.STANDARD: types_pb2.SLO_CLASS_STANDARD,
    SloClass.BATCH: types_pb2.SLO_CLASS_BATCH,
}
_SLO_FROM_PB = {value: slo for slo, value in _SLO_TO_PB.items()}


# --------------------------------------------------------------------------- keys, labels, SLO


def target_key_to_pb(key: TargetKey) -> types_pb2.TargetKey:
    return types_pb2.TargetKey(model=key.model, node=key.node, endpoint=key.endpoint)


def target_key_from_pb(msg: types_pb2.TargetKey) -> TargetKey:
    if not (msg.model and msg.node and msg.endpoint):
        raise ValueError(
            f"incomplete TargetKey (model={msg.model!r}, node={msg.node!r}, "
            f"endpoint={msg.endpoint!r}): all three are required"
        )
    return TargetKey(model=msg.model, node=msg.node, endpoint=msg.endpoint)


def gpu_key_to_pb(key: GpuKey) -> types_pb2.GpuKey:
    return types_pb2.GpuKey(node=key.node, gpu_uuid=key.gpu_uuid)


def gpu_key_from_pb(msg: types_pb2.GpuKey) -> GpuKey:
    if not (msg.node and msg.gpu_uuid):
        raise ValueError(
            f"incomplete GpuKey (node={msg.node!r}, gpu_uuid={msg.gpu_uuid!r}): both are required"
        )
    return GpuKey(node=msg.node, gpu_uuid=msg.gpu_uuid)


def labels_to_pb(labels: Labels) -> types_pb2.Labels:
    return types_pb2.Labels(
        model=labels.model,
        revision=labels.revision,
        runtime=labels.runtime,
        node=labels.node,
        gpu_uuid=labels.gpu_uuid,
        mig_profile=labels.mig_profile,
        quant=labels.quant,
        tenant=labels.tenant,
        zone=labels.zone,
        custom=dict(labels.custom),
    )


def labels_from_pb(msg: types_pb2.Labels) -> Labels:
    return Labels(
        model=msg.model,
        revision=msg.revision,
        runtime=msg.runtime,
        node=msg.node,
        gpu_uuid=msg.gpu_uuid,
        mig_profile=msg.mig_profile,
        quant=msg.quant,
        tenant=msg.tenant,
        zone=msg.zone,
        custom=dict(msg.custom),
    )


def slo_class_to_pb(slo: SloClass) -> types_pb2.SloClass.ValueType:
    return _SLO_TO_PB[slo]


def slo_class_from_pb(value: int) -> SloClass:
    """UNSPECIFIED (0) means STANDARD; an unknown number raises ValueError."""
    if value == types_pb2.SLO_CLASS_UNSPECIFIED:
        return SloClass.STANDARD
    try:
        return _SLO_FROM_PB[types_pb2.SloClass.ValueType(value)]
    except KeyError:
        raise ValueError(f"unknown SloClass enum value {value}") from None


# --------------------------------------------------------------------------- request features


def request_features_to_pb(request: RequestFeatures) -> scoring_pb2.RequestFeatures:
    return scoring_pb2.RequestFeatures(
        model=request.model,
        slo_class=slo_class_to_pb(request.slo_class),
        prompt_tokens=request.prompt_tokens,
        max_output_tokens=request.max_output_tokens,
        prefix_key=request.prefix_key,
        tenant=request.tenant,
        stream=request.stream,
        filters=dict(request.filters),
        request_id=request.request_id,
        prefix_keys=request.prefix_keys,
    )


def request_features_from_pb(msg: scoring_pb2.RequestFeatures) -> RequestFeatures:
    if not msg.model:
        raise ValueError("RequestFeatures.model is empty")
    return RequestFeatures(
        model=msg.model,
        slo_class=slo_class_from_pb(msg.slo_class),
        prompt_tokens=msg.prompt_tokens,
        max_output_tokens=msg.max_output_tokens,
        prefix_key=msg.prefix_key,
        tenant=msg.tenant,
        stream=msg.stream,
        filters=dict(msg.filters),
        request_id=msg.request_id,
        prefix_keys=tuple(msg.prefix_keys),
    )


# --------------------------------------------------------------------------- model state


def _fill_model_fields(fields: types_pb2.ModelStateFields, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name == "labels":
            fields.labels.CopyFrom(labels_to_pb(value))
        elif name == "adapters":
            fields.adapters.extend(value)
        elif value is None:
            fields.ClearField(name)  # type: ignore[arg-type]
        else:
            setattr(fields, name, value)


def _read_model_fields(fields: types_pb2.ModelStateFields, names: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name == "labels":
            out[name] = labels_from_pb(fields.labels)
        elif name == "adapters":
            out[name] = tuple(fields.adapters)
        elif name in _MODEL_OPTIONAL and not fields.HasField(name):  # type: ignore[arg-type]
            out[name] = None
        else:
            out[name] = getattr(fields, name)
    return out


def model_state_to_pb(state: ModelState) -> types_pb2.ModelState:
    msg = types_pb2.ModelState(
        key=target_key_to_pb(state.key), version=state.version, work_left_s=state.work_left_s
    )
    _fill_model_fields(msg.fields, {name: getattr(state, name) for name in _MODEL_FIELDS})
    return msg


def model_state_from_pb(msg: types_pb2.ModelState) -> ModelState:
    values = _read_model_fields(msg.fields, _MODEL_FIELDS)
    return ModelState(key=target_key_from_pb(msg.key), version=msg.version, **values)


def model_delta_to_pb(delta: ModelStateDelta) -> types_pb2.ModelStateDelta:
    msg = types_pb2.ModelStateDelta(
        key=target_key_to_pb(delta.key), version=delta.version, changed=sorted(delta.changes)
    )
    _fill_model_fields(msg.fields, delta.changes)
    return msg


def model_delta_from_pb(msg: types_pb2.ModelStateDelta) -> ModelStateDelta:
    unknown = sorted(set(msg.changed) - set(_MODEL_FIELDS))
    if unknown:
        raise ValueError(
            f"ModelStateDelta.changed names unknown field(s) {unknown}; "
            f"known: {', '.join(_MODEL_FIELDS)}"
        )
    changes = _read_model_fields(msg.fields, msg.changed)
    return ModelStateDelta(key=target_key_from_pb(msg.key), version=msg.version, changes=changes)


def model_snapshot_delta_pb(state: ModelState) -> types_pb2.ModelStateDelta:
    """A delta carrying every field of `state`: what a watcher's initial snapshot sends."""
    return model_delta_to_pb(
        ModelStateDelta(
            key=state.key,
            version=state.version,
            changes={name: getattr(state, name) for name in _MODEL_FIELDS},
        )
    )


# --------------------------------------------------------------------------- GPU state


def _fill_gpu_fields(fields: types_pb2.GpuStateFields, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        if name == "labels":
            fields.labels.CopyFrom(labels_to_pb(value))
        elif name == "clock_event_reasons":
            fields.clock_event_reasons.extend(sorted(value))
        else:
            setattr(fields, name, value)


def _read_gpu_fields(fields: types_pb2.GpuStateFields, names: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        if name == "labels":
            out[name] = labels_from_pb(fields.labels)
        elif name == "clock_event_reasons":
            out[name] = frozenset(fields.clock_event_reasons)
        else:
            out[name] = getattr(fields, name)
    return out


def gpu_state_to_pb(state: GpuState) -> types_pb2.GpuState:
    healthy, reason = state.health
    msg = types_pb2.GpuState(
        key=gpu_key_to_pb(state.key),
        version=state.version,
        vram_headroom=state.vram_headroom,
        healthy=healthy,
        health_reason=reason,
    )
    _fill_gpu_fields(msg.fields, {name: getattr(state, name) for name in _GPU_FIELDS})
    return msg


def gpu_state_from_pb(msg: types_pb2.GpuState) -> GpuState:
    values = _read_gpu_fields(msg.fields, _GPU_FIELDS)
    return GpuState(key=gpu_key_from_pb(msg.key), version=msg.version, **values)


def gpu_delta_to_pb(delta: GpuStateDelta) -> types_pb2.GpuStateDelta:
    msg = types_pb2.GpuStateDelta(
        key=gpu_key_to_pb(delta.key), version=delta.version, changed=sorted(delta.changes)
    )
    _fill_gpu_fields(msg.fields, delta.changes)
    return msg


def gpu_delta_from_pb(msg: types_pb2.GpuStateDelta) -> GpuStateDelta:
    unknown = sorted(set(msg.changed) - set(_GPU_FIELDS))
    if unknown:
        raise ValueError(
            f"GpuStateDelta.changed names unknown field(s) {unknown}; "
            f"known: {', '.join(_GPU_FIELDS)}"
        )
    changes = _read_gpu_fields(msg.fields, msg.changed)
    return GpuStateDelta(key=gpu_key_from_pb(msg.key), version=msg.version, changes=changes)


def gpu_snapshot_delta_pb(state: GpuState) -> types_pb2.GpuStateDelta:
    """A delta carrying every field of `state`: what a watcher's initial snapshot sends."""
    return gpu_delta_to_pb(
        GpuStateDelta(
            key=state.key,
            version=state.version,
            changes={name: getattr(state, name) for name in _GPU_FIELDS},
        )
    )

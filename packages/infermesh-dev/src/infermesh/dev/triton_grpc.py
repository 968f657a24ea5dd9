"""The Triton emulator's gRPC front end: KServe's GRPCInferenceService over `TritonCore`.

Translation only: protobuf messages to core calls and back, refusals to gRPC status codes with
Triton's messages. Outputs travel as `raw_output_contents`, as Triton sends them.
"""

from __future__ import annotations

from typing import Any, NoReturn

import grpc

from infermesh.core.proto import kserve_pb2 as pb
from infermesh.core.proto import kserve_pb2_grpc as pb_grpc
from infermesh.dev.triton_server import EMULATED_TRITON_VERSION, EXTENSIONS, TritonCore
from infermesh.dev.triton_tensors import (
    DATATYPES,
    KServeError,
    Tensor,
    element_count,
    from_raw,
    invalid,
    to_raw,
)

__all__ = ["TritonGrpcService", "add_to_server"]

# Which InferTensorContents field carries each datatype.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _input_tensor(entry: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    where = f"input '{entry.name}'"
    if entry.datatype not in DATATYPES:
        raise invalid(f"{where}: unsupported datatype {entry.datatype!r}")
    shape = tuple(int(dim) for dim in entry.shape)
    if any(dim < 0 for dim in shape):
        raise invalid(f"{where}: shape dimensions must be >= 0")
    count = element_count(shape)
    if raw is not None:
        return Tensor(
            entry.name, entry.datatype, shape, from_raw(entry.datatype, raw, count, where)
        )
    field = _CONTENTS_FIELD.get(entry.datatype)
    if field is None:
        raise invalid(f"{where}: {entry.datatype} data must be sent in raw_input_contents")
    values: Any = getattr(entry.contents, field)
    if len(values) != count:
        raise invalid(
            f"{where}: unexpected number of elements {len(values)} for shape {list(shape)}, "
            f"expecting {count}"
        )
    return Tensor(entry.name, entry.datatype, shape, tuple(values))


class TritonGrpcService(pb_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService backed by one emulated server."""

    def __init__(self, core: TritonCore) -> None:
        self.core = core

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        ready = self.core.repository.is_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="triton", version=EMULATED_TRITON_VERSION, extensions=list(EXTENSIONS)
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        try:
            spec, _ = self.core.repository.resolve(request.name, request.version or None)
        except KServeError as exc:
            await _abort(context, exc)
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=list(spec.versions),
            platform=spec.platform,
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=list(t.shape)
                )
                for t in spec.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name=t.name, datatype=t.datatype, shape=list(t.shape)
                )
                for t in spec.outputs
            ],
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        try:
            raws = list(request.raw_input_contents)
            if raws and len(raws) != len(request.inputs):
                raise invalid(f"expected {len(request.inputs)} raw_input_contents, got {len(raws)}")
            tensors = [
                _input_tensor(entry, raws[index] if raws else None)
                for index, entry in enumerate(request.inputs)
            ]
        except KServeError as exc:
            self.core.count_bad_request(request.model_name, request.model_version or None)
            await _abort(context, exc)
        try:
            result = await self.core.infer(
                request.model_name,
                request.model_version or None,
                tensors,
                [output.name for output in request.outputs],
            )
        except KServeError as exc:
            await _abort(context, exc)
        return pb.ModelInferResponse(
            model_name=result.model.name,
            model_version=result.version,
            id=request.id,
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name=t.name, datatype=t.datatype, shape=list(t.shape)
                )
                for t in result.outputs
            ],
            raw_output_contents=[to_raw(t) for t in result.outputs],
        )

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        rows = self.core.repository.index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(
            models=[pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
        )

    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelLoadResponse:
        parameters: dict[str, object] = {}
        if "config" in request.parameters:
            parameters["config"] = request.parameters["config"].string_param
        try:
            await self.core.load(request.model_name, parameters)
        except KServeError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.RepositoryModelUnloadResponse:
        try:
            self.core.unload(request.model_name)
        except KServeError as exc:
            await _abort(context, exc)
        return pb.RepositoryModelUnloadResponse()


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: KServeError) -> NoReturn:
    code = getattr(grpc.StatusCode, error.grpc_code)
    await context.abort(code, error.message)
    raise AssertionError("context.abort returned")  # abort always raises


def add_to_server(server: grpc.aio.Server, core: TritonCore) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(TritonGrpcService(core), server)

"""Drives a KServe/Triton gRPC server with Triton's own client (`tritonclient.grpc`) and prints
one JSON document of what it saw. Run as a separate process: Triton's generated protobuf module
and InferMesh's `kserve_pb2` declare the same `inference.*` names, so one process cannot import
both."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException


def main(target: str) -> dict[str, Any]:
    client = triton_grpc.InferenceServerClient(target)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.int32)
    inputs = []
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        tensor = triton_grpc.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    result = client.infer("simple", inputs, request_id="tc-1")
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "server": client.get_server_metadata().name,
        "inputs": [t.name for t in client.get_model_metadata("simple").inputs],
        "sum": result.as_numpy("OUTPUT0").tolist(),
        "difference": result.as_numpy("OUTPUT1").tolist(),
        "id": result.get_response().id,
        "index": [m.name for m in client.get_model_repository_index().models],
    }
    client.unload_model("simple")
    seen["ready_after_unload"] = client.is_model_ready("simple")
    client.load_model("simple")
    seen["ready_after_load"] = client.is_model_ready("simple")
    try:
        client.infer("nope", inputs)
    except InferenceServerException as exc:
        seen["unknown_model"] = [exc.status(), exc.message()]
    client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))

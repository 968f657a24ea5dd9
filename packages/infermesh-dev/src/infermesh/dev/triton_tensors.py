"""KServe v2 tensors for the Triton emulator: datatypes, JSON and raw (binary) encodings.

Sans-I/O: turns request JSON, binary extension payloads and gRPC contents into flat Python
values and back. Every bad input raises `KServeError` with the message Triton would give and
the HTTP status KServe maps it to; never touches the network.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "DATATYPES",
    "KServeError",
    "Tensor",
    "element_count",
    "flatten",
    "from_raw",
    "tensor_from_json",
    "tensor_to_json",
    "to_raw",
]

Value = int | float | bool | bytes

# struct format of one element, for every datatype with a fixed size.
_STRUCT: dict[str, str] = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP16": "e",
    "FP32": "f",
    "FP64": "d",
}
DATATYPES: frozenset[str] = frozenset({*_STRUCT, "BYTES"})
"""Datatypes the emulator accepts (KServe's, less BF16)."""

_INT_RANGES: dict[str, tuple[int, int]] = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}


class KServeError(Exception):
    """A request the server refuses: `status` is the HTTP status, `message` Triton's text.

    `grpc_code` names the gRPC status code the same refusal gets on the gRPC endpoint.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def grpc_code(self) -> str:
        return {404: "NOT_FOUND", 503: "UNAVAILABLE", 500: "INTERNAL", 501: "UNIMPLEMENTED"}.get(
            self.status, "INVALID_ARGUMENT"
        )


def invalid(message: str) -> KServeError:
    return KServeError(400, message)


@attrs.frozen
class Tensor:
    """One named tensor: datatype, shape and its elements flattened in row-major order."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Value, ...]


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def flatten(data: Any, where: str) -> list[Any]:
    """Row-major elements of a JSON `data` value (flat or nested lists)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        try:
            item = next(stack[-1])
        except StopIteration:
            stack.pop()
            continue
        if isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in value
    ):
        raise invalid(f"{where}: 'shape' must be a list of non-negative integers")
    return tuple(value)


def _element(datatype: str, value: Any, where: str) -> Value:
    """One JSON element checked and converted to its datatype's Python value."""
    if datatype == "BYTES":
        if isinstance(value, str):
            return value.encode()
        raise invalid(f"{where}: BYTES elements must be strings in JSON, got {value!r}")
    if datatype == "BOOL":
        if isinstance(value, bool):
            return value
        raise invalid(f"{where}: BOOL elements must be true or false, got {value!r}")
    if datatype in _INT_RANGES:
        if isinstance(value, int) and not isinstance(value, bool):
            low, high = _INT_RANGES[datatype]
            if low <= value <= high:
                return value
            raise invalid(f"{where}: {value} is out of range for {datatype}")
        raise invalid(f"{where}: {datatype} elements must be integers, got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise invalid(f"{where}: {datatype} elements must be numbers, got {value!r}")


def tensor_from_json(
    entry: Any, index: int, raw: bytes | None = None, kind: str = "input"
) -> Tensor:
    """An input tensor from one entry of the request's `inputs` (its bytes in `raw` if binary)."""
    if not isinstance(entry, dict):
        raise invalid(f"{kind} {index} must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(f"{kind} {index} has no string 'name'")
    where = f"{kind} '{name}'"
    datatype = entry.get("datatype")
    if datatype not in DATATYPES:
        raise invalid(
            f"{where}: unsupported datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    shape = _shape(entry.get("shape"), where)
    count = element_count(shape)
    if raw is not None:
        return Tensor(name, datatype, shape, from_raw(datatype, raw, count, where))
    if "data" not in entry:
        raise invalid(f"{where}: no 'data' (and no binary_data_size parameter)")
    elements = flatten(entry["data"], where)
    if len(elements) != count:
        raise invalid(
            f"{where}: unexpected number of elements {len(elements)} for shape {list(shape)}, "
            f"expecting {count}"
        )
    return Tensor(name, datatype, shape, tuple(_element(datatype, v, where) for v in elements))


def tensor_to_json(tensor: Tensor) -> dict[str, Any]:
    """A response `outputs` entry with JSON data (BYTES decoded as UTF-8)."""
    if tensor.datatype == "BYTES":
        data: list[Any] = [
            v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in tensor.data
        ]
    else:
        data = list(tensor.data)
    return {
        "name": tensor.name,
        "datatype": tensor.datatype,
        "shape": list(tensor.shape),
        "data": data,
    }


def from_raw(datatype: str, raw: bytes, count: int, where: str) -> tuple[Value, ...]:
    """Elements of a little-endian raw tensor (binary extension, gRPC raw contents)."""
    if datatype == "BYTES":
        out: list[Value] = []
        pos = 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise invalid(f"{where}: truncated BYTES element length at byte {pos}")
            (length,) = struct.unpack_from("<I", raw, pos)
            pos += 4
            if pos + length > len(raw):
                raise invalid(f"{where}: BYTES element of {length} bytes runs past the data")
            out.append(raw[pos : pos + length])
            pos += length
        if len(out) != count:
            raise invalid(f"{where}: {len(out)} BYTES elements for a shape of {count} elements")
        return tuple(out)
    fmt = _STRUCT[datatype]
    size = struct.calcsize(fmt)
    if len(raw) != size * count:
        raise invalid(
            f"{where}: unexpected total byte size {len(raw)}, expecting {size * count} "
            f"({count} x {datatype})"
        )
    return tuple(struct.unpack(f"<{count}{fmt}", raw))


def to_raw(tensor: Tensor) -> bytes:
    """The little-endian raw encoding of `tensor` (BYTES: 4-byte length before each element)."""
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.data:
            blob = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(blob)) + blob)
        return b"".join(parts)
    return struct.pack(f"<{len(tensor.data)}{_STRUCT[tensor.datatype]}", *tensor.data)


def binary_size(entry: Mapping[str, Any]) -> int | None:
    """The `binary_data_size` parameter of a request input, or None when its data is JSON."""
    parameters = entry.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid(f"input '{entry.get('name')}': binary_data_size must be an integer >= 0")
    return size

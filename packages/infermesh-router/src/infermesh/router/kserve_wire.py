"""The model a KServe v2 gRPC request names, read from its protobuf bytes without decoding it.

`ModelReadyRequest`, `ModelMetadataRequest` and `ModelInferRequest` all carry the model name in
field 1 and the version in field 2 (strings). Reading just those lets the gRPC ingress route a
request and pass its bytes to Triton untouched: tensors are never copied or re-encoded. Pure.
"""

from __future__ import annotations

__all__ = ["MalformedMessage", "model_of"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class MalformedMessage(ValueError):
    """The bytes are not a protobuf message."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise MalformedMessage("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise MalformedMessage("varint longer than 10 bytes")


def model_of(message: bytes) -> tuple[str, str]:
    """(field 1, field 2) as text: the model name and version ("" when absent).

    Scans every field (any order is valid protobuf; the last value of a field wins) but only
    decodes those two. Raises `MalformedMessage` for bytes that are not a protobuf message or a
    name that is not UTF-8.
    """
    name = version = b""
    pos, end = 0, len(message)
    while pos < end:
        key, pos = _varint(message, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise MalformedMessage("field number 0")
        if wire_type == _VARINT:
            _, pos = _varint(message, pos)
        elif wire_type == _I64:
            pos += 8
        elif wire_type == _I32:
            pos += 4
        elif wire_type == _LEN:
            length, pos = _varint(message, pos)
            if pos + length > end:
                raise MalformedMessage(f"field {field} runs past the end of the message")
            if field == 1:
                name = message[pos : pos + length]
            elif field == 2:
                version = message[pos : pos + length]
            pos += length
        else:
            raise MalformedMessage(f"unsupported wire type {wire_type} in field {field}")
        if pos > end:
            raise MalformedMessage(f"field {field} runs past the end of the message")
    try:
        return name.decode(), version.decode()
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"model name or version is not UTF-8 ({exc})") from None

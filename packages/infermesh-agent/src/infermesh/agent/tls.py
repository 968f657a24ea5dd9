"""Mutual TLS for gRPC: server and channel credentials from PEM files, and the caller's InferMesh
identity read from its verified client certificate.

The credentials require a client certificate signed by the configured CA, so an unknown client
fails in the handshake. This module never decides what an identity may do; the ACLs do that.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

from infermesh.agent.certs import Identity, IdentityError, identity_from_certificate

__all__ = [
    "CALLER",
    "ClientIdentityInterceptor",
    "TLSFileError",
    "channel_credentials",
    "peer_identity",
    "read_pem",
    "require_peer_identity",
    "server_credentials",
]

# The identity of the client whose call is being served; set by ClientIdentityInterceptor.
CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("infermesh_caller")


class TLSFileError(ValueError):
    """A certificate, key or CA file named in the TLS settings cannot be read."""


def read_pem(path: str | Path, what: str) -> bytes:
    """The bytes of a PEM file, or a TLSFileError naming the file and what it was for."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TLSFileError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise TLSFileError(f"the {what} {path} is not a PEM file")
    return data


def server_credentials(
    cert_path: str | Path, key_path: str | Path, ca_path: str | Path
) -> grpc.ServerCredentials:
    """Server credentials that present this node's certificate and require a client certificate
    signed by the CA at `ca_path`."""
    return grpc.ssl_server_credentials(
        [(read_pem(key_path, "key"), read_pem(cert_path, "certificate"))],
        root_certificates=read_pem(ca_path, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(
    ca_path: str | Path,
    cert_path: str | Path | None = None,
    key_path: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """Channel credentials that trust servers signed by the CA at `ca_path` and, with a
    certificate and key, present them as the client's identity."""
    if (cert_path is None) != (key_path is None):
        raise TLSFileError("a client certificate needs its key, and a key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_path, "CA certificate"),
        private_key=None if key_path is None else read_pem(key_path, "key"),
        certificate_chain=None if cert_path is None else read_pem(cert_path, "certificate"),
    )


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """The identity in the caller's client certificate; IdentityError when there is none.

    gRPC puts the verified peer certificate in the auth context as `x509_pem_cert` only after
    a successful mutual TLS handshake, so a plaintext or server-only TLS call has none.
    """
    certificates = context.auth_context().get("x509_pem_cert") or []
    if not certificates:
        raise IdentityError("the call carries no client certificate (mutual TLS required)")
    return identity_from_certificate(certificates[0])


async def require_peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> Identity:
    """`peer_identity`, or end the call with UNAUTHENTICATED and the reason."""
    try:
        return peer_identity(context)
    except IdentityError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        raise AssertionError("unreachable: abort raises") from None


_Behavior = Callable[..., Any]


class ClientIdentityInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # untyped grpc
    """Refuses every call without a valid InferMesh client identity (UNAUTHENTICATED) and
    makes the identity available to the handler as `CALLER.get()`."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary_response(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary_response(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream_response(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(cast(_Behavior, handler.stream_stream)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _wrap_unary_response(behavior: _Behavior) -> _Behavior:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        CALLER.set(await require_peer_identity(context))
        return await behavior(request, context)

    return wrapped


def _wrap_stream_response(behavior: _Behavior) -> _Behavior:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        CALLER.set(await require_peer_identity(context))
        result = behavior(request, context)
        if hasattr(result, "__aiter__"):
            async for response in result:
                yield response
        else:
            # A handler that writes with context.write() and returns nothing.
            await result

    return wrapped

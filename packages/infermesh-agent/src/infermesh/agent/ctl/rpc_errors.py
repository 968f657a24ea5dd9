"""The translation of a failed gRPC call into a message a user can act on and an exit code.
Pure: a status code and its details in, a `CtlError` out; never touches a channel.

It has to read gRPC's connection error text, because a refused TLS handshake and an unreachable
port both reach the client as UNAVAILABLE; the phrases matched are gRPC core's.
"""

from __future__ import annotations

import attrs
import grpc

from infermesh.agent.ctl.errors import CtlError, ExitCode

__all__ = ["CallTarget", "rpc_error"]


@attrs.frozen
class CallTarget:
    """What a message about a failed call names: the endpoint and the TLS files used."""

    endpoint: str
    ca: str
    cert: str
    timeout_s: float


# gRPC core's words for a connection that never got as far as TLS.
_UNREACHABLE_PHRASES = (
    ("Connection refused", "connection refused"),
    ("Domain name not found", "the host name does not resolve"),
    ("errors resolving", "the host name does not resolve"),
    ("No route to host", "no route to host"),
    ("Network is unreachable", "the network is unreachable"),
    ("Connection timed out", "the connection timed out"),
    ("Connection reset", "the connection was reset"),
)


def _connection_failed(details: str) -> bool:
    return "failed to connect to all addresses" in details or "errors resolving" in details


def _unreachable(target: CallTarget, why: str) -> CtlError:
    return CtlError(
        f"cannot reach the agent at {target.endpoint} ({why}); is control.listen set on that "
        "agent, and is this its host and port?",
        ExitCode.UNREACHABLE,
    )


def _connection_error(target: CallTarget, details: str) -> CtlError | None:
    """The error for an UNAVAILABLE that came from connecting, or None for a server's answer."""
    if "Hostname Verification" in details:
        host = target.endpoint.rpartition(":")[0]
        return CtlError(
            f"the agent's certificate at {target.endpoint} does not name {host}: dial the agent "
            "by a host name or address listed in its certificate (infermesh certs issue --host)",
            ExitCode.REFUSED,
        )
    if "Tls handshake failed" in details or "CERTIFICATE_VERIFY_FAILED" in details:
        return CtlError(
            f"the agent's certificate at {target.endpoint} is not trusted by CA {target.ca}: "
            "check that --ca (or the profile's ca) is the CA that issued the agent's control "
            "certificate",
            ExitCode.REFUSED,
        )
    if "Failed to create security handshaker" in details:
        return CtlError(
            f"the certificate {target.cert} and its key cannot be used for TLS: check that "
            "--key is the key issued with --cert",
            ExitCode.USAGE,
        )
    for phrase, why in _UNREACHABLE_PHRASES:
        if phrase in details:
            return _unreachable(target, why)
    if _connection_failed(details) and "Socket closed" in details:
        # The server ends the handshake without a word when it does not accept our certificate.
        return CtlError(
            f"the agent at {target.endpoint} refused this certificate ({target.cert}): check "
            "that it was issued by the CA the agent trusts (its control.ca), that it has not "
            "expired, and that --key is its key",
            ExitCode.REFUSED,
        )
    if _connection_failed(details):
        return _unreachable(target, details)
    if "Socket closed" in details:
        return _unreachable(target, "the connection was closed; did the agent stop?")
    return None


def rpc_error(code: grpc.StatusCode, details: str, target: CallTarget) -> CtlError:
    """The CLI error for a call that ended with `code` and `details`."""
    details = details or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return CtlError(details, ExitCode.USAGE)
    if code == grpc.StatusCode.NOT_FOUND:
        return CtlError(details, ExitCode.NOT_FOUND)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return CtlError(
            f"refused: {details} (certificate {target.cert}; an admin can grant a role with an "
            "acls policy entry)",
            ExitCode.REFUSED,
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CtlError(
            f"the agent at {target.endpoint} refused this certificate ({target.cert}): {details}",
            ExitCode.REFUSED,
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return _unreachable(target, f"no answer within {target.timeout_s:g} s")
    if code == grpc.StatusCode.UNAVAILABLE:
        connection = _connection_error(target, details)
        if connection is not None:
            return connection
        return CtlError(f"the agent could not do it: {details}", ExitCode.FAILED)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CtlError(
            f"the agent at {target.endpoint} does not offer this call (an older agent?): {details}",
            ExitCode.FAILED,
        )
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
        return CtlError(details, ExitCode.FAILED)  # the agent's message says what is in the way
    return CtlError(f"{code.name.lower()}: {details}", ExitCode.FAILED)

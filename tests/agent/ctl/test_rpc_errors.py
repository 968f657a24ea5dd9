"""A failed Control API call becomes one line a user can act on and an exit code: invalid input 2,
not found 3, refused (role, certificate, TLS trust) 4, unreachable 5, anything else 1. gRPC
reports TLS and connection failures alike as UNAVAILABLE; the details tell them apart."""

from __future__ import annotations

import grpc
import pytest

from infermesh.agent.ctl.errors import ExitCode
from infermesh.agent.ctl.rpc_errors import CallTarget, rpc_error

TARGET = CallTarget(
    endpoint="10.0.0.1:7960", ca="/certs/ca.pem", cert="/certs/alice.pem", timeout_s=10.0
)
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("code", "details", "exit_code", "says"),
    [
        (
            grpc.StatusCode.INVALID_ARGUMENT,
            "pins['llama'].min_replicas: must be >= 0, got -1",
            ExitCode.USAGE,
            "pins['llama'].min_replicas: must be >= 0, got -1",
        ),
        (grpc.StatusCode.NOT_FOUND, "no node 'gpu-9'", ExitCode.NOT_FOUND, "no node 'gpu-9'"),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "bob has role viewer, which may not call SetPolicy",
            ExitCode.REFUSED,
            "bob has role viewer, which may not call SetPolicy (certificate /certs/alice.pem",
        ),
        (
            grpc.StatusCode.UNAUTHENTICATED,
            "the certificate carries no InferMesh identity",
            ExitCode.REFUSED,
            "the agent at 10.0.0.1:7960 refused this certificate (/certs/alice.pem)",
        ),
        (
            UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:7960: "
            "Failed to connect to remote host: Connection refused",
            ExitCode.UNREACHABLE,
            "cannot reach the agent at 10.0.0.1:7960 (connection refused); is control.listen set",
        ),
        (
            UNAVAILABLE,
            "errors resolving agent-1:7960: [field:hostname lookup error:address lookup failed "
            "for agent-1:7960: Domain name not found]",
            ExitCode.UNREACHABLE,
            "(the host name does not resolve)",
        ),
        (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "Deadline Exceeded",
            ExitCode.UNREACHABLE,
            "cannot reach the agent at 10.0.0.1:7960 (no answer within 10 s)",
        ),
        (
            UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:7960: Tls "
            "handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: unable to get local issuer",
            ExitCode.REFUSED,
            "certificate at 10.0.0.1:7960 is not trusted by CA /certs/ca.pem",
        ),
        (
            UNAVAILABLE,
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:10.0.0.1:7960: "
            "Socket closed",
            ExitCode.REFUSED,
            "the agent at 10.0.0.1:7960 refused this certificate (/certs/alice.pem)",
        ),
        (
            UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.1:7960: Custom "
            "verification check failed with error: UNAUTHENTICATED: Hostname Verification Check "
            "failed.",
            ExitCode.REFUSED,
            "does not name 10.0.0.1",
        ),
        (
            UNAVAILABLE,
            "the change was not committed (no leader); no leader is known; retry later",
            ExitCode.FAILED,
            "the agent could not do it: the change was not committed (no leader)",
        ),
        (
            UNAVAILABLE,
            "Socket closed",
            ExitCode.UNREACHABLE,
            "(the connection was closed; did the agent stop?)",
        ),
        (grpc.StatusCode.INTERNAL, "boom", ExitCode.FAILED, "internal: boom"),
        (
            grpc.StatusCode.FAILED_PRECONDITION,
            "The lora adapter 'sql' has already been loaded.",
            ExitCode.FAILED,
            "The lora adapter 'sql' has already been loaded.",
        ),
    ],
)
def test_a_failed_call_gets_a_message_and_exit_code(
    code: grpc.StatusCode, details: str, exit_code: ExitCode, says: str
) -> None:
    error = rpc_error(code, details, TARGET)
    assert error.exit_code == exit_code
    assert says in error.message

"""The CLI's TLS credentials from the CA, certificate and key files, checked before dialing: an
unreadable file, a key that is not the certificate's, or an expired certificate is reported
here, naming the file, instead of as a failed handshake. Reads only those three files.
"""

from __future__ import annotations

import datetime

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from infermesh.agent.ctl.errors import CtlError, ExitCode
from infermesh.agent.tls import TLSFileError, read_pem

__all__ = ["certificate_problem", "client_credentials"]

_PUBLIC = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_problem(
    cert_pem: bytes, key_pem: bytes, cert_path: str, key_path: str, now: datetime.datetime
) -> CtlError | None:
    """Why this certificate and key cannot identify the caller, or None when they can."""
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return CtlError(f"the certificate {cert_path} is not a PEM certificate", ExitCode.USAGE)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return CtlError(f"the key {key_path} is not an unencrypted PEM private key", ExitCode.USAGE)
    if certificate.public_key().public_bytes(*_PUBLIC) != key.public_key().public_bytes(*_PUBLIC):
        return CtlError(
            f"the key {key_path} is not the key of the certificate {cert_path}: pass the "
            "-key.pem file issued with it",
            ExitCode.USAGE,
        )
    expired_at = certificate.not_valid_after_utc
    if expired_at < now:
        return CtlError(
            f"the certificate {cert_path} expired on {expired_at:%Y-%m-%d %H:%M} UTC, so agents "
            "refuse it: ask for a new one (infermesh certs issue)",
            ExitCode.REFUSED,
        )
    return None


def client_credentials(ca: str, cert: str, key: str) -> grpc.ChannelCredentials:
    """Channel credentials that trust the agents `ca` issued and present `cert`; CtlError naming
    the file when one cannot be used."""
    try:
        ca_pem = read_pem(ca, "CA certificate")
        cert_pem = read_pem(cert, "certificate")
        key_pem = read_pem(key, "key")
    except TLSFileError as exc:
        raise CtlError(str(exc), ExitCode.USAGE) from None
    problem = certificate_problem(cert_pem, key_pem, cert, key, datetime.datetime.now(datetime.UTC))
    if problem is not None:
        raise problem
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )

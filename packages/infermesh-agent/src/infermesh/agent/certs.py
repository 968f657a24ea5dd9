"""Certificates for the Control API's mutual TLS: a private CA, node and client certificates that
carry an InferMesh identity (`spiffe://infermesh/<role>/<name>` as a URI SAN), and reading it back.

The certificate building and parsing is pure (objects and bytes in, objects and bytes out). The
only I/O is `write_pem_files`/`load_ca` and the two directory helpers on top of them; they never
overwrite a file unless asked to, and write private keys with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, cast, get_args

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_DAYS",
    "CA_KEY_FILE",
    "LEAF_DAYS",
    "ROLES",
    "TRUST_DOMAIN",
    "CertificateAuthority",
    "CertificateError",
    "FilesExistError",
    "Identity",
    "IdentityError",
    "IssuedCertificate",
    "Role",
    "build_ca",
    "identity_from_certificate",
    "init_ca_dir",
    "issue_certificate",
    "issue_to_dir",
    "leaf_file_names",
    "load_ca",
    "write_pem_files",
]

Role = Literal["admin", "operator", "viewer", "node"]
ROLES: tuple[Role, ...] = get_args(Role)
# The SPIFFE trust domain of every identity this module issues and the only one it trusts.
TRUST_DOMAIN = "infermesh"
CA_DAYS = 3650
LEAF_DAYS = 365
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
# Certificates start 5 minutes in the past so a peer whose clock is a little behind accepts them.
BACKDATE = datetime.timedelta(minutes=5)

# A name becomes a file name and a URI path segment, so it is kept to a safe, readable alphabet.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_IDENTITY_URI_RE = re.compile(
    rf"spiffe://{re.escape(TRUST_DOMAIN)}/(?P<role>[a-z]+)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)"
)


class CertificateError(ValueError):
    """A certificate, key or CA directory could not be built, read or written."""


class IdentityError(CertificateError):
    """A peer certificate carries no InferMesh identity this agent trusts."""


class FilesExistError(CertificateError):
    """Writing would overwrite existing files (pass force to replace them)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        listed = ", ".join(str(path) for path in self.paths)
        super().__init__(f"{listed} already exist(s); use --force to replace")


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise CertificateError(
            f"invalid name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise CertificateError(f"invalid role {role!r}: expected one of {', '.join(ROLES)}")
    return role


@attrs.frozen
class Identity:
    """Who a certificate speaks for: a name and the role the CA granted it."""

    name: str = attrs.field(validator=lambda _i, _a, value: _check_name(value))
    role: Role = attrs.field(validator=lambda _i, _a, value: _check_role(value))

    @property
    def uri(self) -> str:
        """The URI SAN that carries this identity in a certificate."""
        return f"spiffe://{TRUST_DOMAIN}/{self.role}/{self.name}"

    def __str__(self) -> str:
        return f"{self.name} ({self.role})"


@attrs.frozen
class CertificateAuthority:
    """A CA certificate with its private key: what `issue_certificate` signs with."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@attrs.frozen
class IssuedCertificate:
    """A freshly issued certificate and its new private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _key_pem(self.key)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage with only the named usages set (the constructor wants all nine)."""
    usages = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    usages.update(allowed)
    return x509.KeyUsage(**usages)


def build_ca(
    *,
    days: int = CA_DAYS,
    common_name: str = "InferMesh CA",
    now: datetime.datetime | None = None,
) -> CertificateAuthority:
    """A self-signed EC P-256 CA: CA:TRUE with pathlen 0 (it signs leaves only), cert sign + CRL."""
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "InferMesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    public_key = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(certificate=certificate, key=key)


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise CertificateError(f"invalid host {host!r}: expected a DNS name or an IP address")
    return x509.DNSName(host)


def issue_certificate(
    ca: CertificateAuthority,
    identity: Identity,
    *,
    hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
    now: datetime.datetime | None = None,
) -> IssuedCertificate:
    """A leaf certificate for `identity`, signed by `ca`.

    The identity is the URI SAN (`Identity.uri`); `hosts` become DNS/IP SANs, which a client
    checks against the address it dials. A node certificate may serve and connect (server and
    client auth); admin, operator and viewer certificates only connect. The leaf never outlives
    its CA.
    """
    if days < 1:
        raise CertificateError(f"days must be at least 1, got {days}")
    if hosts and identity.role != "node":
        raise CertificateError("hosts are for node certificates only (they name a server)")
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + datetime.timedelta(days=days), ca.certificate.not_valid_after_utc)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if identity.role == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    san.extend(_host_name(host) for host in dict.fromkeys(hosts))
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    certificate = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "InferMesh"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.name),
                ]
            )
        )
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(digital_signature=True),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return IssuedCertificate(certificate=certificate, key=key)


def _load_certificate(data: bytes | str | x509.Certificate) -> x509.Certificate:
    if isinstance(data, x509.Certificate):
        return data
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise IdentityError(f"not a readable X.509 certificate: {exc}") from None


def identity_from_certificate(data: bytes | str | x509.Certificate) -> Identity:
    """The InferMesh identity in a certificate (PEM or DER), from its one identity URI SAN.

    Only `spiffe://infermesh/<role>/<name>` counts: the subject, DNS names and other URIs are
    ignored, and two identity URIs in one certificate are refused as ambiguous. This reads; it
    does not verify the signature or validity dates, which the TLS handshake has already done.
    """
    certificate = _load_certificate(data)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subject alternative names") from None
    except ValueError as exc:
        raise IdentityError(f"unreadable certificate extensions: {exc}") from None
    prefix = f"spiffe://{TRUST_DOMAIN}/"
    uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    ours = [uri for uri in uris if uri.startswith(prefix)]
    if not ours:
        raise IdentityError(
            f"the certificate has no {prefix}<role>/<name> URI SAN "
            f"(its URI SANs: {', '.join(uris) or 'none'})"
        )
    if len(ours) > 1:
        raise IdentityError(f"the certificate has more than one identity URI: {', '.join(ours)}")
    match = _IDENTITY_URI_RE.fullmatch(ours[0])
    if match is None:
        raise IdentityError(f"malformed identity URI {ours[0]!r}: expected {prefix}<role>/<name>")
    try:
        return Identity(name=match["name"], role=cast(Role, match["role"]))
    except CertificateError as exc:
        raise IdentityError(f"identity URI {ours[0]!r}: {exc}") from None


# --------------------------------------------------------------------------- files


def leaf_file_names(name: str) -> tuple[str, str]:
    """(certificate, key) file names for an issued certificate: `<name>.pem`, `<name>-key.pem`."""
    _check_name(name)
    return f"{name}.pem", f"{name}-key.pem"


def write_pem_files(files: Mapping[Path, tuple[bytes, bool]], *, force: bool = False) -> None:
    """Write {path: (pem, is_secret)}; secrets get mode 0600. Checks every path before writing."""
    if not force:
        existing = [path for path in files if path.exists()]
        if existing:
            raise FilesExistError(existing)
    for path, (pem, secret) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if secret else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
        try:
            fd = os.open(path, flags, mode)
        except FileExistsError:
            raise FilesExistError([path]) from None
        except OSError as exc:
            raise CertificateError(f"cannot write {path}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as file:
            # A replaced file keeps its old mode through O_TRUNC; set it explicitly.
            os.fchmod(file.fileno(), mode)
            file.write(pem)


def load_ca(directory: Path) -> CertificateAuthority:
    """The CA in `directory` (ca.pem and ca-key.pem), with errors that say what to do."""
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    missing = [path for path in (cert_path, key_path) if not path.is_file()]
    if missing:
        raise CertificateError(
            f"no CA in {directory}: {', '.join(map(str, missing))} not found; "
            "run `infermesh certs init` first or pass --dir"
        )
    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"cannot read the CA in {directory}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{key_path}: the CA key must be an EC key for this tool")
    if (
        key.public_key().public_numbers()
        != cast(ec.EllipticCurvePublicKey, certificate.public_key()).public_numbers()
    ):
        raise CertificateError(f"{key_path} is not the key of {cert_path}")
    return CertificateAuthority(certificate=certificate, key=key)


def init_ca_dir(directory: Path, *, days: int = CA_DAYS, force: bool = False) -> list[Path]:
    """Create a CA in `directory`; returns the files written (certificate first)."""
    ca = build_ca(days=days)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    write_pem_files(
        {
            cert_path: (ca.certificate.public_bytes(serialization.Encoding.PEM), False),
            key_path: (_key_pem(ca.key), True),
        },
        force=force,
    )
    return [cert_path, key_path]


def issue_to_dir(
    directory: Path,
    identity: Identity,
    *,
    hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
    force: bool = False,
) -> list[Path]:
    """Issue a certificate from the CA in `directory` and write it there; returns the files."""
    cert_name, key_name = leaf_file_names(identity.name)
    if cert_name == CA_CERT_FILE:
        raise CertificateError(f"the name {identity.name!r} would clash with the CA's files")
    cert_path, key_path = directory / cert_name, directory / key_name
    if not force:
        existing = [path for path in (cert_path, key_path) if path.exists()]
        if existing:
            raise FilesExistError(existing)
    issued = issue_certificate(load_ca(directory), identity, hosts=hosts, days=days)
    write_pem_files(
        {cert_path: (issued.certificate_pem, False), key_path: (issued.key_pem, True)},
        force=force,
    )
    return [cert_path, key_path]

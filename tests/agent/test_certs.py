"""Certificates: a CA, node and client certificates with the identity in a URI SAN, the files
`infermesh certs init|issue` write, and which identities are trusted when read back."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from infermesh.agent.certs import (
    CertificateError,
    Identity,
    IdentityError,
    build_ca,
    identity_from_certificate,
    issue_certificate,
)
from infermesh.agent.certs_cli import certs_group


@pytest.fixture(scope="module")
def ca_and_leaf() -> tuple[x509.Certificate, x509.Certificate]:
    ca = build_ca(days=30)
    leaf = issue_certificate(
        ca, Identity("node-1", "node"), hosts=["node-1.example", "10.0.0.1", "localhost"]
    )
    return ca.certificate, leaf.certificate


def test_ca_is_a_self_signed_ca_that_signs_leaves_only(
    ca_and_leaf: tuple[x509.Certificate, x509.Certificate],
) -> None:
    ca, _ = ca_and_leaf
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=30) <= lifetime < datetime.timedelta(days=31)


def test_node_certificate_carries_identity_and_hosts_and_is_signed_by_the_ca(
    ca_and_leaf: tuple[x509.Certificate, x509.Certificate],
) -> None:
    ca, leaf = ca_and_leaf
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://infermesh/node/node-1"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["node-1.example", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    usages = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc


def test_identity_round_trips_through_pem_and_der(
    ca_and_leaf: tuple[x509.Certificate, x509.Certificate],
) -> None:
    _, leaf = ca_and_leaf
    pem = leaf.public_bytes(serialization.Encoding.PEM)
    der = leaf.public_bytes(serialization.Encoding.DER)
    expected = Identity("node-1", "node")
    assert identity_from_certificate(pem) == expected
    assert identity_from_certificate(pem.decode()) == expected
    assert identity_from_certificate(der) == expected


@pytest.mark.parametrize("role", ["admin", "operator", "viewer"])
def test_client_certificates_are_for_client_auth_only(role: str) -> None:
    issued = issue_certificate(build_ca(), Identity("alice", role))  # type: ignore[arg-type]
    assert identity_from_certificate(issued.certificate_pem) == Identity("alice", role)  # type: ignore[arg-type]
    usages = list(
        issued.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_hosts_are_refused_on_client_certificates() -> None:
    with pytest.raises(CertificateError, match="node certificates only"):
        issue_certificate(build_ca(), Identity("alice", "admin"), hosts=["a.example"])


@pytest.mark.parametrize(
    ("name", "role"), [("bad/name", "admin"), ("", "admin"), ("alice", "root"), ("-x", "node")]
)
def test_invalid_names_and_roles_are_refused(name: str, role: str) -> None:
    with pytest.raises(CertificateError):
        Identity(name, role)  # type: ignore[arg-type]


def _self_signed_with_uris(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    from cryptography.hazmat.primitives import hashes

    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize(
    ("uris", "reason"),
    [
        ([], "no subject alternative names"),
        (["spiffe://other/admin/alice"], "no spiffe://infermesh/"),
        (["spiffe://infermesh/root/alice"], "invalid role"),
        (["spiffe://infermesh/admin/alice/extra"], "malformed"),
        (["spiffe://infermesh/admin/a", "spiffe://infermesh/viewer/b"], "more than one"),
    ],
)
def test_only_the_issued_san_format_is_trusted(uris: list[str], reason: str) -> None:
    with pytest.raises(IdentityError, match=reason):
        identity_from_certificate(_self_signed_with_uris(uris))


def test_garbage_is_not_a_certificate() -> None:
    with pytest.raises(IdentityError, match="not a readable"):
        identity_from_certificate(b"not a certificate")


# --------------------------------------------------------------------------- CLI


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_init_and_issue_write_files_that_load(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = tmp_path / "pki"
    result = runner.invoke(certs_group, ["init", "--dir", str(directory), "--days", "90"])
    assert result.exit_code == 0, result.output
    assert f"wrote {directory / 'ca.pem'}" in result.output
    assert f"wrote {directory / 'ca-key.pem'}" in result.output
    assert _mode(directory / "ca-key.pem") == 0o600

    result = runner.invoke(
        certs_group,
        ["issue", "node-1", "--role", "node", "--host", "127.0.0.1", "--dir", str(directory)],
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {directory / 'node-1.pem'}" in result.output
    assert "spiffe://infermesh/node/node-1" in result.output
    assert _mode(directory / "node-1-key.pem") == 0o600

    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate((directory / "node-1.pem").read_bytes())
    leaf.verify_directly_issued_by(ca)
    key = serialization.load_pem_private_key(
        (directory / "node-1-key.pem").read_bytes(), password=None
    )
    assert key.public_key() == leaf.public_key()
    assert identity_from_certificate(leaf) == Identity("node-1", "node")


def test_certs_refuse_to_overwrite_without_force(tmp_path: Path) -> None:
    runner = CliRunner()
    directory = str(tmp_path)
    assert runner.invoke(certs_group, ["init", "--dir", directory]).exit_code == 0
    ca_before = (tmp_path / "ca.pem").read_bytes()

    result = runner.invoke(certs_group, ["init", "--dir", directory])
    assert result.exit_code == 1
    assert "already exist" in result.output
    assert "--force" in result.output
    assert (tmp_path / "ca.pem").read_bytes() == ca_before

    issue = ["issue", "bob", "--role", "viewer", "--dir", directory]
    assert runner.invoke(certs_group, issue).exit_code == 0
    bob_before = (tmp_path / "bob.pem").read_bytes()
    result = runner.invoke(certs_group, issue)
    assert result.exit_code == 1
    assert "bob.pem" in result.output
    assert (tmp_path / "bob.pem").read_bytes() == bob_before

    result = runner.invoke(certs_group, [*issue, "--force"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bob.pem").read_bytes() != bob_before
    assert _mode(tmp_path / "bob-key.pem") == 0o600

    result = runner.invoke(certs_group, ["init", "--dir", directory, "--force"])
    assert result.exit_code == 0
    assert (tmp_path / "ca.pem").read_bytes() != ca_before


def test_certs_issue_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        certs_group, ["issue", "alice", "--role", "admin", "--dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "no CA in" in result.output
    assert "infermesh certs init" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["alice", "--role", "root"], "'root' is not one of"),
        (["../alice", "--role", "admin"], "invalid name"),
        (["alice", "--role", "admin", "--host", "a.example"], "node certificates only"),
        (["ca", "--role", "admin"], "clash with the CA"),
    ],
)
def test_certs_issue_rejects_bad_input(tmp_path: Path, args: list[str], message: str) -> None:
    runner = CliRunner()
    assert runner.invoke(certs_group, ["init", "--dir", str(tmp_path)]).exit_code == 0
    result = runner.invoke(certs_group, ["issue", *args, "--dir", str(tmp_path)])
    assert result.exit_code != 0
    assert message in result.output

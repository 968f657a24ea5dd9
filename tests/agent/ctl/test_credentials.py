"""The CLI checks its certificate and key before dialing: a key that is not the certificate's, a
file that is not what it should be, or an expired certificate is one clear error naming the file."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from infermesh.agent.certs import Identity, init_ca_dir, issue_to_dir
from infermesh.agent.ctl.credentials import certificate_problem, client_credentials
from infermesh.agent.ctl.errors import CtlError, ExitCode

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_ca_dir(tmp_path, days=30)
    issue_to_dir(tmp_path, Identity("alice", "admin"), days=10)
    issue_to_dir(tmp_path, Identity("bob", "viewer"), days=10)
    return tmp_path


def problem(pki: Path, cert: str, key: str, now: datetime.datetime = NOW) -> CtlError | None:
    cert_path, key_path = pki / cert, pki / key
    return certificate_problem(
        cert_path.read_bytes(), key_path.read_bytes(), str(cert_path), str(key_path), now
    )


def test_a_certificate_with_its_own_key_is_fine(pki: Path) -> None:
    assert problem(pki, "alice.pem", "alice-key.pem") is None
    client_credentials(str(pki / "ca.pem"), str(pki / "alice.pem"), str(pki / "alice-key.pem"))


def test_another_certificates_key_is_a_usage_error_naming_both_files(pki: Path) -> None:
    found = problem(pki, "alice.pem", "bob-key.pem")
    assert found is not None
    assert found.exit_code == ExitCode.USAGE
    assert found.message.startswith(
        f"the key {pki / 'bob-key.pem'} is not the key of the certificate {pki / 'alice.pem'}"
    )


def test_a_certificate_given_as_the_key_is_a_usage_error(pki: Path) -> None:
    found = problem(pki, "alice.pem", "ca.pem")
    assert found is not None
    assert found.message == f"the key {pki / 'ca.pem'} is not an unencrypted PEM private key"


def test_an_expired_certificate_is_refused_before_dialing(pki: Path) -> None:
    found = problem(pki, "alice.pem", "alice-key.pem", NOW + datetime.timedelta(days=11))
    assert found is not None
    assert found.exit_code == ExitCode.REFUSED
    assert f"the certificate {pki / 'alice.pem'} expired on" in found.message
    assert "infermesh certs issue" in found.message


def test_a_missing_ca_file_is_named(pki: Path) -> None:
    with pytest.raises(CtlError) as missing:
        client_credentials(
            str(pki / "nope.pem"), str(pki / "alice.pem"), str(pki / "alice-key.pem")
        )
    assert missing.value.exit_code == ExitCode.USAGE
    assert f"cannot read the CA certificate {pki / 'nope.pem'}" in missing.value.message

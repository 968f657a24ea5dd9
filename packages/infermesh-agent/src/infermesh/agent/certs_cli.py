"""`infermesh certs ...`: make a CA and issue node and client certificates for the Control API.

Only turns flags into calls of `infermesh.agent.certs` and reports which files were written;
every error a user can meet is printed as one line with exit status 2 (bad input) or 1 (I/O).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from infermesh.agent.certs import (
    CA_DAYS,
    LEAF_DAYS,
    ROLES,
    CertificateError,
    Identity,
    init_ca_dir,
    issue_to_dir,
)

__all__ = ["DEFAULT_CERTS_DIR", "certs_group"]

DEFAULT_CERTS_DIR = "certs"

_dir_option = click.option(
    "--dir",
    "directory",
    default=DEFAULT_CERTS_DIR,
    show_default=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the CA (ca.pem, ca-key.pem) and the issued files.",
)
_force_option = click.option("--force", is_flag=True, help="Replace files that already exist.")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"infermesh certs: error: {message}", err=True)
    raise SystemExit(code)


def _report(paths: Sequence[Path]) -> None:
    for path in paths:
        click.echo(f"wrote {path}")


@click.group("certs")
def certs_group() -> None:
    """Certificates for the Control API's mutual TLS (docs/certificates.md)."""


@certs_group.command("init")
@_dir_option
@click.option(
    "--days",
    default=CA_DAYS,
    show_default=True,
    type=click.IntRange(min=1),
    help="How long the CA is valid.",
)
@_force_option
def init_command(directory: Path, days: int, force: bool) -> None:
    """Create a certificate authority in DIR (ca.pem, and ca-key.pem with mode 0600).

    Keep ca-key.pem secret and off the nodes: whoever holds it can mint an admin certificate.
    """
    try:
        written = init_ca_dir(directory, days=days, force=force)
    except CertificateError as exc:  # includes FilesExistError
        _fail(str(exc), 1)
    _report(written)


@certs_group.command("issue")
@click.argument("name")
@click.option(
    "--role",
    required=True,
    type=click.Choice(ROLES),
    help="node for agents; admin, operator or viewer for people and scripts.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    metavar="HOST",
    help="DNS name or IP address the node is reached at (repeatable; node certificates only).",
)
@_dir_option
@click.option(
    "--days",
    default=LEAF_DAYS,
    show_default=True,
    type=click.IntRange(min=1),
    help="How long the certificate is valid (never longer than the CA).",
)
@_force_option
def issue_command(
    name: str, role: str, hosts: Sequence[str], directory: Path, days: int, force: bool
) -> None:
    """Issue a certificate for NAME with ROLE, signed by the CA in DIR.

    Writes DIR/NAME.pem and DIR/NAME-key.pem (mode 0600). The identity
    spiffe://infermesh/ROLE/NAME is recorded as a URI subject alternative name.

    \b
    infermesh certs issue node-1 --role node --host node-1.example --host 10.0.0.1
    infermesh certs issue alice --role operator
    """
    try:
        identity = Identity(name=name, role=role)  # type: ignore[arg-type]  # click.Choice
    except CertificateError as exc:
        _fail(str(exc), 2)
    if hosts and role != "node":
        _fail("--host is for node certificates only (it names a server)", 2)
    try:
        written = issue_to_dir(directory, identity, hosts=hosts, days=days, force=force)
    except CertificateError as exc:  # includes FilesExistError
        _fail(str(exc), 1)
    _report(written)
    click.echo(f"identity {identity.uri}")
    if role == "node" and not hosts:
        click.echo(
            "note: no --host given; clients must dial this node by a name in its certificate, "
            "so add --host for every address it is reached at",
            err=True,
        )

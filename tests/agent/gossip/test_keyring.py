"""The gossip keyring: AES-GCM sealing, key rotation without downtime, key files."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from infermesh.agent.gossip.keyring import (
    SEAL_OVERHEAD,
    BadPacket,
    KeyFileError,
    Keyring,
    SealError,
    UnknownKey,
    generate_key,
    key_id,
)

OLD = bytes(range(32))
NEW = bytes(range(100, 132))
PLAINTEXT = b"\x0a\x06node-a gossip packet"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_a_sealed_packet_opens_to_the_same_plaintext() -> None:
    ring = Keyring([OLD])
    sealed = ring.seal(PLAINTEXT)
    assert len(sealed) == len(PLAINTEXT) + SEAL_OVERHEAD == len(PLAINTEXT) + 33
    assert sealed[0] == 1
    assert sealed[1:5] == key_id(OLD)
    assert PLAINTEXT not in sealed
    assert ring.open(sealed) == PLAINTEXT
    assert ring.seal(b"") != ring.seal(b"")  # a fresh nonce every time
    assert ring.open(ring.seal(b"")) == b""


@pytest.mark.parametrize("size", [16, 24, 32])
def test_every_aes_key_size_works(size: int) -> None:
    ring = Keyring([os.urandom(size)])
    assert ring.open(ring.seal(PLAINTEXT)) == PLAINTEXT


def test_keys_rotate_without_downtime() -> None:
    sender, receiver = Keyring([OLD]), Keyring([OLD])
    receiver.install(NEW)  # 1. every node installs the new key: still sealing with the old
    assert receiver.primary == OLD
    assert receiver.keys == (OLD, NEW)
    assert receiver.open(sender.seal(PLAINTEXT)) == PLAINTEXT
    sender.install(NEW)
    sender.use(NEW)  # 2. nodes switch to sealing with the new key, one by one
    assert sender.keys == (NEW, OLD)
    assert receiver.open(sender.seal(PLAINTEXT)) == PLAINTEXT
    assert sender.open(receiver.seal(PLAINTEXT)) == PLAINTEXT  # the lagging node still works
    receiver.use(NEW)
    late = Keyring([OLD]).seal(PLAINTEXT)
    receiver.remove(OLD)  # 3. the old key goes away everywhere
    assert list(receiver.keys) == [NEW]
    with pytest.raises(UnknownKey, match=key_id(OLD).hex()):
        receiver.open(late)
    assert receiver.open(sender.seal(PLAINTEXT)) == PLAINTEXT


def test_a_packet_under_a_key_never_installed_is_unknown_key() -> None:
    with pytest.raises(UnknownKey):
        Keyring([OLD]).open(Keyring([NEW]).seal(PLAINTEXT))


def test_every_tampered_byte_is_rejected() -> None:
    ring = Keyring([OLD])
    sealed = ring.seal(PLAINTEXT)
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        # A changed key id names a key we do not hold; anything else fails authentication.
        expected: type[SealError] = UnknownKey if 1 <= position < 5 else BadPacket
        with pytest.raises(expected):
            ring.open(bytes(tampered))


def test_truncated_packets_are_bad_packets() -> None:
    ring = Keyring([OLD])
    sealed = ring.seal(PLAINTEXT)
    for end in range(len(sealed)):
        with pytest.raises(BadPacket):
            ring.open(sealed[:end])


def test_an_unknown_format_version_is_a_bad_packet() -> None:
    ring = Keyring([OLD])
    sealed = bytearray(ring.seal(PLAINTEXT))
    sealed[0] = 2
    with pytest.raises(BadPacket, match="unknown seal version 2"):
        ring.open(bytes(sealed))


def test_the_header_is_authenticated_even_under_the_right_key() -> None:
    ring = Keyring([OLD])
    sealed = ring.seal(PLAINTEXT)
    other_nonce = sealed[:5] + bytes(12) + sealed[17:]
    with pytest.raises(BadPacket, match="authentication"):
        ring.open(other_nonce)


def test_keyring_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        Keyring([])
    with pytest.raises(ValueError, match="16, 24 or 32 bytes, got 10"):
        Keyring([bytes(10)])
    ring = Keyring([OLD])
    with pytest.raises(ValueError, match="not installed"):
        ring.use(NEW)
    with pytest.raises(ValueError, match="primary"):
        ring.remove(OLD)
    ring.install(OLD)  # installing twice changes nothing
    ring.remove(NEW)  # removing a key that is not there changes nothing
    assert ring.keys == (OLD,)


def test_key_file_lists_keys_primary_first_skipping_comments(tmp_path: Path) -> None:
    path = tmp_path / "gossip.keys"
    path.write_text(f"# cluster keys\n\n  {b64(NEW)}  \n{b64(OLD)} # old, remove after rollout\n")
    ring = Keyring.from_file(path)
    assert ring.keys == (NEW, OLD)
    assert ring.primary == NEW


def test_a_generated_key_loads_from_a_key_file(tmp_path: Path) -> None:
    path = tmp_path / "gossip.keys"
    path.write_text(generate_key() + "\n")
    ring = Keyring.from_file(path)
    assert len(ring.primary) == 32
    assert ring.open(ring.seal(PLAINTEXT)) == PLAINTEXT
    assert generate_key() != generate_key()


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (f"{b64(OLD)}\nnot*base64!\n", r"gossip.keys, line 2: not base64"),
        (f"# c\n{b64(bytes(20))}\n", r"gossip.keys, line 2: the key is 20 bytes"),
        ("# only a comment\n\n", r"gossip.keys holds no key"),
        ("", r"gossip.keys holds no key"),
        (f"{b64(OLD)}\n{b64(OLD)[:-2]}\n", r"line 2: not base64"),
    ],
    ids=["not-base64", "wrong-length", "only-comments", "empty", "truncated-key"],
)
def test_bad_key_files_name_the_file_and_line(tmp_path: Path, content: str, error: str) -> None:
    path = tmp_path / "gossip.keys"
    path.write_text(content)
    with pytest.raises(KeyFileError, match=error):
        Keyring.from_file(path)


def test_a_missing_key_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"cannot read gossip key file .*missing.keys"):
        Keyring.from_file(tmp_path / "missing.keys")

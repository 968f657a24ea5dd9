"""The gossip keyring: seals packets with AES-GCM under the primary key and opens them under any
installed key, so keys rotate without downtime (install everywhere, use, then remove the old).

Pure crypto on bytes; never touches sockets. `Keyring.from_file` is the one place that reads a file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "SEAL_OVERHEAD",
    "BadPacket",
    "KeyFileError",
    "Keyring",
    "SealError",
    "UnknownKey",
    "generate_key",
    "key_id",
]

VERSION = 1
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + KEY_ID_BYTES + NONCE_BYTES
SEAL_OVERHEAD = HEADER_BYTES + TAG_BYTES  # 33: version + key id + nonce + GCM tag
KEY_SIZES = (16, 24, 32)  # AES-128, AES-192, AES-256


class SealError(ValueError):
    """A packet could not be opened."""


class UnknownKey(SealError):
    """The packet names a key id this keyring does not hold (another cluster, or a removed key)."""


class BadPacket(SealError):
    """Too short, an unknown format version, or failed authentication (tampered or corrupt)."""


class KeyFileError(ValueError):
    """A key file cannot be read or holds something that is not an AES key."""


def key_id(key: bytes) -> bytes:
    """The 4-byte id a sealed packet carries for `key`: the start of SHA-256(key)."""
    return hashlib.sha256(key).digest()[:KEY_ID_BYTES]


def generate_key() -> str:
    """A new random AES-256 key, base64-encoded: one line of a key file."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) not in KEY_SIZES:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise ValueError(f"an AES key must be 16, 24 or 32 bytes, got {size}")
    return key


class Keyring:
    """Installed AES-GCM keys; the first (primary) seals, any installed key opens.

    Wire format of a sealed packet: version byte (1) | key id (4) | nonce (12) | ciphertext+tag.
    The 17 header bytes are authenticated as associated data, so changing any byte fails.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._keys: list[bytes] = []
        self._ciphers: dict[bytes, tuple[bytes, AESGCM]] = {}  # key id -> (key, cipher)
        for key in keys:
            self.install(key)

    @classmethod
    def from_file(cls, path: Path) -> Keyring:
        """Load base64 keys, one per line, first = primary; blank lines and `#` comments skipped."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read gossip key file {path}: {exc}") from exc
        keys: list[bytes] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            where = f"gossip key file {path}, line {number}"
            try:
                key = base64.b64decode(line, validate=True)
            except (binascii.Error, ValueError):
                raise KeyFileError(
                    f"{where}: not base64; each line must be one key as printed by generate_key()"
                ) from None
            if len(key) not in KEY_SIZES:
                raise KeyFileError(
                    f"{where}: the key is {len(key)} bytes; AES keys are 16, 24 or 32 bytes "
                    "(generate one with generate_key())"
                )
            keys.append(key)
        if not keys:
            raise KeyFileError(
                f"gossip key file {path} holds no key: add one base64 key per line "
                "(the first is used to seal)"
            )
        try:
            return cls(keys)
        except ValueError as exc:
            raise KeyFileError(f"gossip key file {path}: {exc}") from exc

    @property
    def primary(self) -> bytes:
        """The key that seals outgoing packets."""
        return self._keys[0]

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every installed key, primary first."""
        return tuple(self._keys)

    def install(self, key: bytes) -> None:
        """Accept packets sealed with `key` from now on (no-op if already installed)."""
        _check_key(key)
        ident = key_id(key)
        held = self._ciphers.get(ident)
        if held is not None:
            if held[0] != key:
                raise ValueError(f"key id {ident.hex()} collides with an installed key")
            return
        self._keys.append(key)
        self._ciphers[ident] = (key, AESGCM(key))

    def use(self, key: bytes) -> None:
        """Seal with `key` from now on; it must already be installed."""
        if key not in self._keys:
            raise ValueError(f"key {key_id(key).hex()} is not installed: install it first")
        self._keys.remove(key)
        self._keys.insert(0, key)

    def remove(self, key: bytes) -> None:
        """Stop accepting `key` (no-op if not installed); the primary cannot be removed."""
        if key == self.primary:
            raise ValueError("cannot remove the primary key: use() another key first")
        if key in self._keys:
            self._keys.remove(key)
            del self._ciphers[key_id(key)]

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate `plaintext` under the primary key (SEAL_OVERHEAD more bytes)."""
        key = self.primary
        header = bytes([VERSION]) + key_id(key) + os.urandom(NONCE_BYTES)
        _, cipher = self._ciphers[key_id(key)]
        return header + cipher.encrypt(header[-NONCE_BYTES:], plaintext, header)

    def open(self, data: bytes) -> bytes:
        """The plaintext of a sealed packet; UnknownKey or BadPacket when it cannot be trusted."""
        if len(data) < SEAL_OVERHEAD:
            raise BadPacket(f"sealed packet of {len(data)} bytes is shorter than {SEAL_OVERHEAD}")
        if data[0] != VERSION:
            raise BadPacket(f"unknown seal version {data[0]} (expected {VERSION})")
        header = bytes(data[:HEADER_BYTES])
        held = self._ciphers.get(header[1 : 1 + KEY_ID_BYTES])
        if held is None:
            raise UnknownKey(f"packet sealed with unknown key id {header[1:5].hex()}")
        try:
            return held[1].decrypt(header[-NONCE_BYTES:], bytes(data[HEADER_BYTES:]), header)
        except InvalidTag:
            raise BadPacket(
                "packet failed authentication (tampered, corrupt or wrong key)"
            ) from None

"""The re-identification map, encrypted at rest: an append-only journal of AES-GCM records.

File layout: ``RADFEDV1`` then records of ``<u32 length><12-byte nonce><ciphertext+tag>``.
Each record holds a batch of entries (zlib-compressed JSON). The record's
position is authenticated with it (associated data), so records cannot be
reordered, swapped between files or dropped from the middle unnoticed. A record
is written with one ``write`` and fsynced: a crash leaves at most a torn last
record, which is detected, ignored on read and cut off before the next append —
every record is all there or not there at all.

Only the node's scanner, the reviewer's header diff and the label import read
it (later issues); the de-identification engine only appends.
"""

from __future__ import annotations

import base64
import fcntl
import hmac
import json
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"RADFEDV1"
FIELD_AAD = b"RADFED-SEALED-FIELD-V1"
_LEN = struct.Struct("<L")
_NONCE = 12
MAX_RECORD = 64 * 1024 * 1024


class VaultError(Exception):
    """The vault cannot be opened, decrypted or written."""


def _aad(index: int) -> bytes:
    return MAGIC + struct.pack("<Q", index)


def _scan(fh: Any) -> tuple[int, int]:
    """(number of complete records, offset after the last complete one)."""
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    head = fh.read(len(MAGIC))
    if head == b"":
        return 0, 0
    if head != MAGIC:
        raise VaultError("not a RadFed vault (bad magic)")
    count = 0
    offset = len(MAGIC)
    while offset + _LEN.size <= size:
        fh.seek(offset)
        (length,) = _LEN.unpack(fh.read(_LEN.size))
        if length > MAX_RECORD or offset + _LEN.size + length > size:
            break
        count += 1
        offset += _LEN.size + length
    return count, offset


class Vault:
    """Append and read entries of one node's originals vault."""

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError("the vault key must be 32 bytes")
        self.path = path
        self._key = key
        self._aead = AESGCM(key)
        self._known: tuple[int, int] | None = None  # (records, size) after our last append

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append one record holding ``entries``; durable when this returns."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        plain = zlib.compress(json.dumps(entries, separators=(",", ":")).encode("utf-8"))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with os.fdopen(fd, "r+b", closefd=False) as fh:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    size = os.fstat(fd).st_size
                    if self._known is not None and self._known[1] == size:
                        count, end = self._known
                    else:
                        count, end = _scan(fh)
                    if end == 0:
                        fh.seek(0)
                        fh.write(MAGIC)
                        end = len(MAGIC)
                    fh.truncate(end)  # cut a torn record a crash may have left
                    nonce = os.urandom(_NONCE)
                    sealed = nonce + self._aead.encrypt(nonce, plain, _aad(count))
                    fh.seek(end)
                    fh.write(_LEN.pack(len(sealed)) + sealed)
                    fh.flush()
                    os.fsync(fd)
                    self._known = (count + 1, fh.tell())
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def seal(self, text: str) -> str:
        """Encrypt a short value kept beside the vault (a source path that may name people)."""
        nonce = os.urandom(_NONCE)
        sealed = nonce + self._aead.encrypt(nonce, text.encode("utf-8"), FIELD_AAD)
        return base64.urlsafe_b64encode(sealed).decode("ascii")

    def unseal(self, token: str) -> str:
        """The value :meth:`seal` encrypted. Callers audit the read."""
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], FIELD_AAD).decode("utf-8")
        except (InvalidTag, ValueError) as exc:
            raise VaultError("sealed value does not authenticate: wrong key or tampered") from exc

    def fingerprint(self, text: str) -> str:
        """A keyed, stable digest of a value: equal inputs match, the value stays hidden."""
        return hmac.new(self._key, b"fingerprint\x00" + text.encode("utf-8"), "sha256").hexdigest()

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every entry, oldest first. Raises VaultError on a wrong key or tampering."""
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            count, _ = _scan(fh)
            fh.seek(len(MAGIC))
            for index in range(count):
                (length,) = _LEN.unpack(fh.read(_LEN.size))
                sealed = fh.read(length)
                try:
                    plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(index))
                except InvalidTag as exc:
                    raise VaultError(
                        f"vault record {index} does not authenticate: wrong key or tampered file"
                    ) from exc
                yield from json.loads(zlib.decompress(plain))

"""The re-identification map, encrypted at rest: an append-only journal of AES-GCM records.

File layout: ``RADFEDV2`` then records of
``<u32 length><u32 header check><12-byte nonce><ciphertext+tag>``. Each record
holds a batch of entries (zlib-compressed JSON). The record's position is
authenticated with it (associated data), so records cannot be reordered,
swapped between files or dropped from the middle unnoticed; the header check (a
CRC of the record's position and length) makes a damaged length an error rather
than the end of the vault. A record is written with one ``write`` and fsynced:
a crash leaves at most a torn last record (a prefix of it, or zeros), which is
detected, ignored on read and cut off before the next append — every record is
all there or not there at all. Anything else that does not read back (a flipped
byte anywhere, a wrong key) raises ``VaultError``; nothing is returned silently
short. Cutting whole records off the end is the one change the file alone cannot
show: it looks like a crash before they were written.

Vaults written before the header check (``RADFEDV1``) are read and appended to in
their own layout.

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

from protocols.storage import private_dir

MAGIC = b"RADFEDV2"
#: The first layout: no header check (a damaged length read as the end of the vault).
MAGIC_V1 = b"RADFEDV1"
FIELD_AAD = b"RADFED-SEALED-FIELD-V1"
_LEN = struct.Struct("<L")
_HEADER = struct.Struct("<LL")  # V2: length, CRC-32 of (magic, record index, length)
_NONCE = 12
MAX_RECORD = 64 * 1024 * 1024


class VaultError(Exception):
    """The vault cannot be opened, decrypted or written."""


def _aad(index: int, magic: bytes = MAGIC) -> bytes:
    return magic + struct.pack("<Q", index)


def _check(magic: bytes, index: int, length: int) -> int:
    return zlib.crc32(magic + struct.pack("<QL", index, length))


def _header(magic: bytes, index: int, length: int) -> bytes:
    if magic == MAGIC_V1:
        return _LEN.pack(length)
    return _HEADER.pack(length, _check(magic, index, length))


def _scan(fh: Any) -> tuple[bytes, int, int]:
    """(layout magic, number of complete records, offset after the last complete one).

    A torn last record (a crash mid-write) ends the scan; a damaged header raises.
    """
    size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    head = fh.read(len(MAGIC))
    if head == b"":
        return MAGIC, 0, 0
    if head not in (MAGIC, MAGIC_V1):
        raise VaultError("not a RadFed vault (bad magic)")
    width = _LEN.size if head == MAGIC_V1 else _HEADER.size
    count = 0
    offset = len(MAGIC)
    while offset + width <= size:
        fh.seek(offset)
        raw = fh.read(width)
        if head == MAGIC_V1:
            (length,) = _LEN.unpack(raw)
        else:
            length, check = _HEADER.unpack(raw)
            if check != _check(head, count, length):
                if _only_zeros(fh, offset, size):
                    break  # a crash left the file longer than what reached the disk
                raise VaultError(
                    f"vault record {count} has a damaged header (offset {offset}): "
                    "the file was changed or damaged"
                )
            if length > MAX_RECORD:
                raise VaultError(f"vault record {count} claims {length} bytes: not written here")
        if length > MAX_RECORD or offset + width + length > size:
            break
        count += 1
        offset += width + length
    return head, count, offset


def _only_zeros(fh: Any, offset: int, size: int) -> bool:
    fh.seek(offset)
    while offset < size:
        block = fh.read(min(1 << 20, size - offset))
        if not block or block.count(0) != len(block):
            return False
        offset += len(block)
    return True


class Vault:
    """Append and read entries of one node's originals vault."""

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError("the vault key must be 32 bytes")
        self.path = path
        self._key = key
        self._aead = AESGCM(key)
        #: (layout, records, size) after our last append
        self._known: tuple[bytes, int, int] | None = None

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append one record holding ``entries``; durable when this returns."""
        if not entries:
            return
        private_dir(self.path.parent)
        plain = zlib.compress(json.dumps(entries, separators=(",", ":")).encode("utf-8"))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with os.fdopen(fd, "r+b", closefd=False) as fh:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    size = os.fstat(fd).st_size
                    if self._known is not None and self._known[2] == size:
                        magic, count, end = self._known
                    else:
                        magic, count, end = _scan(fh)
                    if end == 0:
                        fh.seek(0)
                        fh.write(magic)
                        end = len(magic)
                    fh.truncate(end)  # cut a torn record a crash may have left
                    nonce = os.urandom(_NONCE)
                    sealed = nonce + self._aead.encrypt(nonce, plain, _aad(count, magic))
                    fh.seek(end)
                    fh.write(_header(magic, count, len(sealed)) + sealed)
                    fh.flush()
                    os.fsync(fd)
                    self._known = (magic, count + 1, fh.tell())
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
            magic, count, _ = _scan(fh)
            width = _LEN.size if magic == MAGIC_V1 else _HEADER.size
            fh.seek(len(magic))
            for index in range(count):
                (length,) = _LEN.unpack(fh.read(width)[: _LEN.size])
                sealed = fh.read(length)
                try:
                    plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(index, magic))
                except InvalidTag as exc:
                    raise VaultError(
                        f"vault record {index} does not authenticate: wrong key or tampered file"
                    ) from exc
                yield from json.loads(zlib.decompress(plain))

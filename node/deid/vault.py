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

Records are numbered from 0 in the order they were written; :meth:`Vault.append`
returns the number of the record it wrote, and :meth:`Vault.records` decrypts
just the records asked for, so a reader that knows where its entries are (the
node index keeps each instance's record number) does not decrypt the whole
vault. To find a record without rescanning the file, a ``Vault`` keeps the
offset of every record it has seen, read from the headers alone (nothing is
decrypted to find them), and extends that list from the last record it knew
when the file has grown — another process may append to the same vault. When
the file is shorter than what it knew, or its first or last known record is no
longer where it was (the file was replaced), it reads the headers again from
the start. Every header is checked again when its record is read.

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
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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


def _width(magic: bytes) -> int:
    return _LEN.size if magic == MAGIC_V1 else _HEADER.size


@dataclass
class _Layout:
    """Where the complete records of one vault file start, read from their headers."""

    magic: bytes
    #: The offset of each complete record's header, by record number.
    offsets: list[int] = field(default_factory=list)
    #: The offset just after the last complete record (0: an empty file).
    end: int = 0
    #: The magic and the first and last records' headers and nonces, as read: a file
    #: that no longer starts and ends the same way is another file and is read again.
    mark: bytes = b""


def _mark(fh: Any, layout: _Layout) -> bytes:
    """What :attr:`_Layout.mark` holds for ``layout``, read from the file."""
    fh.seek(0)
    parts = [fh.read(len(layout.magic))]
    if layout.offsets:
        span = _width(layout.magic) + _NONCE
        for offset in (layout.offsets[0], layout.offsets[-1]):
            fh.seek(offset)
            parts.append(fh.read(span))
    return b"".join(parts)


def _scan(fh: Any, size: int) -> _Layout:
    """The layout of a file read from its first header on."""
    fh.seek(0)
    head = fh.read(len(MAGIC))
    if head == b"":
        return _Layout(MAGIC)
    if head not in (MAGIC, MAGIC_V1):
        raise VaultError("not a RadFed vault (bad magic)")
    layout = _Layout(head, end=len(head))
    _extend(fh, layout, size)
    return layout


def _extend(fh: Any, layout: _Layout, size: int) -> None:
    """Add the complete records written after ``layout.end`` to ``layout``.

    A torn last record (a crash mid-write) ends the scan; a damaged header raises.
    The layout is left consistent (every offset in it is a complete record) either way.
    """
    head = layout.magic
    width = _width(head)
    count = len(layout.offsets)
    offset = layout.end
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
        layout.offsets.append(offset)
        count += 1
        offset += width + length
        layout.end = offset


def _no_such_record(number: int, count: int) -> VaultError:
    held = f"{count} record(s), 0 to {count - 1}" if count else "no record"
    return VaultError(
        f'Argument "numbers": vault record {number} does not exist (the vault holds {held})'
    )


def _only_zeros(fh: Any, offset: int, size: int) -> bool:
    fh.seek(offset)
    while offset < size:
        block = fh.read(min(1 << 20, size - offset))
        if not block or block.count(0) != len(block):
            return False
        offset += len(block)
    return True


class Vault:
    """Append and read entries of one node's originals vault.

    One object may be shared by threads: what it knows of the file's layout is
    guarded by a lock, and appends from any process are serialised by a lock on
    the file.
    """

    def __init__(self, path: Path, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError("the vault key must be 32 bytes")
        self.path = path
        self._key = key
        self._aead = AESGCM(key)
        #: The records this object has seen, by offset (headers only, nothing decrypted).
        self._layout: _Layout | None = None
        self._lock = threading.Lock()

    def _sync(self, fh: Any) -> _Layout:
        """The layout of the open file: what was known, extended by what was appended since.

        Called with ``self._lock`` held.
        """
        size = os.fstat(fh.fileno()).st_size
        layout = self._layout
        if (
            layout is None
            or layout.end == 0
            or size < layout.end
            or _mark(fh, layout) != layout.mark
        ):
            # Nothing known yet, or the file is not the one we knew (shorter, replaced).
            layout = _scan(fh, size)
            layout.mark = _mark(fh, layout)
            self._layout = layout
            return layout
        known = len(layout.offsets)
        try:
            _extend(fh, layout, size)
        finally:
            if len(layout.offsets) != known:  # the records found before a damaged header too
                layout.mark = _mark(fh, layout)
        return layout

    def append(self, entries: list[dict[str, Any]]) -> int | None:
        """Append one record holding ``entries``; durable when this returns.

        Returns
        -------
        int or None
            The number of the record written (0 for the first record of the vault),
            for :meth:`records`; None when ``entries`` is empty (nothing is written).
        """
        if not entries:
            return None
        private_dir(self.path.parent)
        plain = zlib.compress(json.dumps(entries, separators=(",", ":")).encode("utf-8"))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            with os.fdopen(fd, "r+b", closefd=False) as fh:
                # The file lock first, then the object's: never the other way round, or a
                # thread waiting for another process's append would hold up this one's.
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    with self._lock:
                        layout = self._sync(fh)
                        magic, count = layout.magic, len(layout.offsets)
                        if layout.end == 0:
                            fh.seek(0)
                            fh.write(magic)
                            layout.end = len(magic)
                        end = layout.end
                        fh.truncate(end)  # cut a torn record a crash may have left
                        nonce = os.urandom(_NONCE)
                        sealed = nonce + self._aead.encrypt(nonce, plain, _aad(count, magic))
                        fh.seek(end)
                        fh.write(_header(magic, count, len(sealed)) + sealed)
                        fh.flush()
                        os.fsync(fd)
                        layout.offsets.append(end)
                        layout.end = end + _width(magic) + len(sealed)
                        layout.mark = _mark(fh, layout)
                        return count
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
            with self._lock:
                layout = self._sync(fh)
                count, end = len(layout.offsets), layout.end
            for number in range(count):
                yield from self._read(fh, layout, number, count, end)

    def records(self, numbers: Iterable[int]) -> Iterator[dict[str, Any]]:
        """The entries of the records numbered ``numbers`` (as :meth:`append` returned them).

        Only those records are decrypted, each once, oldest first, with the checks
        :meth:`entries` makes. Raises VaultError on a wrong key or tampering, and
        before anything is returned when a number names no record of the vault.
        """
        wanted = sorted(set(numbers))
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            if wanted:
                raise _no_such_record(wanted[0], 0) from None
            return
        with fh:
            with self._lock:
                layout = self._sync(fh)
                count, end = len(layout.offsets), layout.end
            for number in wanted:
                if not 0 <= number < count:
                    raise _no_such_record(number, count)
            for number in wanted:
                yield from self._read(fh, layout, number, count, end)

    def _read(
        self, fh: Any, layout: _Layout, number: int, count: int, end: int
    ) -> list[dict[str, Any]]:
        """The entries of record ``number``, its header checked again and its content authenticated.

        ``count`` and ``end`` are the layout as it was when the read began (another
        thread may extend it meanwhile; its offsets never change).
        """
        magic, width = layout.magic, _width(layout.magic)
        start = layout.offsets[number]
        stop = layout.offsets[number + 1] if number + 1 < count else end
        length = stop - start - width
        fh.seek(start)
        raw = fh.read(stop - start)
        if len(raw) != stop - start or raw[:width] != _header(magic, number, length):
            raise VaultError(
                f"vault record {number} has a damaged header (offset {start}): "
                "the file was changed or damaged"
            )
        sealed = raw[width:]
        try:
            plain = self._aead.decrypt(sealed[:_NONCE], sealed[_NONCE:], _aad(number, magic))
        except InvalidTag as exc:
            raise VaultError(
                f"vault record {number} does not authenticate: wrong key or tampered file"
            ) from exc
        entries: list[dict[str, Any]] = json.loads(zlib.decompress(plain))
        return entries

"""The site's two secrets, created on first use in the node home with 0600 permissions.

* the site secret keys every pseudonym, UID and date shift (HMAC-SHA256);
* the vault key encrypts the re-identification map (AES-256-GCM).

They are separate so the vault key can be rotated or escrowed without changing
a single pseudonym. Two processes starting at once agree on one secret: a new
secret is published with ``link()``, which fails if another process won.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from protocols.storage import private_dir

SECRET_BYTES = 32


class KeyFileError(Exception):
    """A key file that is missing, unreadable, too short or too open."""


def _private_dir(path: Path) -> None:
    private_dir(path)  # the home too, when this makes it
    os.chmod(path, 0o700)


def _read_key(path: Path) -> bytes:
    try:
        info = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"Cannot read key file {path}: {exc.strerror or exc}") from exc
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"Key file {path} is readable by other users (mode {info.st_mode & 0o777:o}); "
            f"run: chmod 600 {path}"
        )
    text = raw.strip()
    try:
        decoded = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        decoded = raw
    if len(decoded) < SECRET_BYTES:
        raise KeyFileError(
            f"Key file {path} holds {len(decoded)} bytes; at least {SECRET_BYTES} are needed."
        )
    return decoded


def load_or_create(path: Path) -> bytes:
    """Read a key file, creating it (random, hex, 0600) if it does not exist."""
    if path.exists():
        return _read_key(path)
    _private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(SECRET_BYTES).hex().encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process created it first: use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def site_secret(keys_dir: Path, override: Path | None = None) -> bytes:
    """The pseudonymisation secret: ``--site-secret-file`` or ``<home>/keys/site.secret``."""
    if override is not None:
        return _read_key(override)
    return load_or_create(keys_dir / "site.secret")


def vault_key(keys_dir: Path) -> bytes:
    """The 32-byte AES key of the re-identification vault."""
    return load_or_create(keys_dir / "vault.key")[:SECRET_BYTES]

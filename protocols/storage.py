"""Storage helpers both services use (each keeps its own tables and files).

``sqlite_engine`` is how both open SQLite: WAL, ``synchronous=FULL``, foreign
keys, a long busy timeout, and — for the writing engine — ``BEGIN IMMEDIATE``,
so read-then-write sequences (the audit chain) never interleave. ``write_private``
writes a file atomically (temporary file, fsync, rename) with the given mode, for
keys and certificates. ``private_dir`` makes a folder and every missing parent
0700 (``Path.mkdir(parents=True, mode=…)`` gives the mode to the last one only,
leaving a fresh home to the umask).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event


def sqlite_engine(url: str, immediate: bool, pool_size: int = 5) -> Engine:
    """An engine on a SQLite database; ``immediate`` takes the write lock at BEGIN.

    ``pool_size`` connections stay open; up to 10 more are opened under load and
    closed again when they are returned.
    """
    engine = create_engine(
        url,
        pool_size=pool_size,
        connect_args={"isolation_level": None, "timeout": 60, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _missing(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, outermost first."""
    missing = []
    while not path.is_dir() and path.parent != path:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def make_dirs(path: Path, mode: int) -> list[Path]:
    """Create ``path`` and its missing parents with ``mode`` (less the umask); the ones made."""
    made = []
    for folder in _missing(path):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:
            continue
        made.append(folder)
    return made


def private_dir(path: Path) -> None:
    """Create ``path`` and its missing parents 0700; existing folders are left as they are."""
    for folder in make_dirs(path, 0o700):
        folder.chmod(0o700)  # whatever the umask


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; new folders are made 0700."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

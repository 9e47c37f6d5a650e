"""Storage helpers both services use (each keeps its own tables and files).

``sqlite_engine`` is how both open SQLite: WAL, ``synchronous=FULL``, foreign
keys, a long busy timeout, and — for the writing engine — ``BEGIN IMMEDIATE``,
so read-then-write sequences (the audit chain) never interleave. ``write_private``
writes a file atomically (temporary file, fsync, rename) with the given mode, for
keys and certificates.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event


def sqlite_engine(url: str, immediate: bool) -> Engine:
    """An engine on a SQLite database; ``immediate`` takes the write lock at BEGIN."""
    engine = create_engine(
        url,
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


def write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``; the folder is made 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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

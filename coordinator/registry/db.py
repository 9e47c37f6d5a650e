"""Open the registry: SQLite (default) or PostgreSQL, migrated with Alembic.

On SQLite (WAL, ``synchronous=FULL``) writes take the database lock up front
(``BEGIN IMMEDIATE``) so that read-then-write sequences never interleave; on
PostgreSQL every write transaction that appends to the audit log locks its head
row (``SELECT … FOR UPDATE``), which serialises appends the same way. Reads
never block writers on either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from protocols.storage import sqlite_engine

MIGRATIONS = Path(__file__).with_name("migrations")
#: SQLite connections the reading engine keeps open.
READERS = 20


def _normalise(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (the driver RadFed installs)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@dataclass
class Database:
    """The registry database."""

    url: str
    writer: Engine
    reader: Engine
    # One session factory per engine: ``sessionmaker`` makes a Session subclass, and
    # SQLAlchemy builds the event dispatch of every new class — a fresh factory per
    # transaction cost ~0.4 ms of CPU each time (measured by bench/load_coordinator.py).
    _writes: sessionmaker[Session] = field(init=False, repr=False, compare=False)
    _reads: sessionmaker[Session] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._writes = sessionmaker(self.writer, expire_on_commit=False)
        self._reads = sessionmaker(self.reader, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.writer.dialect.name

    @classmethod
    def open(cls, url: str, engine_options: dict[str, Any] | None = None) -> Database:
        url = _normalise(url)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                path = Path(parsed.database)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch(mode=0o600, exist_ok=True)
            writer = sqlite_engine(url, immediate=True)
            # Requests read at once, each on its own connection (the API runs them in a
            # pool of threads): keep that many open, not 5 with the rest opened and
            # closed again (pragmas and all) on every request under load.
            reader = sqlite_engine(url, immediate=False, pool_size=READERS)
        else:
            options = {"pool_pre_ping": True, "pool_size": 10, **(engine_options or {})}
            writer = create_engine(url, **options)
            reader = writer
        migrate(writer)
        return cls(url, writer, reader)

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with self._writes() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read transaction; rows read stay usable after it (nothing is written)."""
        with self._reads() as session, session.begin():
            yield session

    def close(self) -> None:
        self.writer.dispose()
        if self.reader is not self.writer:
            self.reader.dispose()

"""Open the node index: SQLite in WAL mode, migrated to the newest schema with Alembic.

Two engines over one file: writes take the database lock up front (``BEGIN
IMMEDIATE``), so two writers never interleave a read-then-write (the audit
chain depends on it); reads use deferred transactions and never block writers.
Commits are synchronous (``synchronous=FULL``): a committed row survives a crash,
which is what a C-STORE acknowledgement promises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from node.errors import NodeError
from protocols.storage import private_dir, sqlite_engine

MIGRATIONS = Path(__file__).with_name("migrations")


def _engine(path: Path, immediate: bool) -> Engine:
    return sqlite_engine(f"sqlite:///{path}", immediate)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (idempotent)."""
    from alembic import command  # only where a schema may change: it costs ~0.2 s to load
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


@dataclass
class Database:
    """The index database of one node home."""

    path: Path
    writer: Engine
    reader: Engine

    @classmethod
    def open(cls, path: Path) -> Database:
        private_dir(path.parent)
        # 0600 before SQLite opens it: its -wal and -shm files take the database's mode.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        writer = _engine(path, immediate=True)
        migrate(writer)
        return cls(path, writer, _engine(path, immediate=False))

    @classmethod
    def attach(cls, path: Path) -> Database:
        """An index that ``open`` has already brought up to date, without migrating.

        For short-lived helpers of a running node (the training gate starts once per
        Flower message): ``radfed node serve`` migrates before it starts them, and
        loading the migration scripts would cost each of them a few hundred ms.
        """
        if not path.is_file():
            raise NodeError("index_missing", f"no node index at {path}: start the node first")
        return cls(path, _engine(path, immediate=True), _engine(path, immediate=False))

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction: committed when the block ends, rolled back on error."""
        with sessionmaker(self.writer, expire_on_commit=False)() as session, session.begin():
            yield session

    @contextmanager
    def read(self) -> Iterator[Session]:
        with sessionmaker(self.reader)() as session, session.begin():
            yield session

    def close(self) -> None:
        self.writer.dispose()
        self.reader.dispose()

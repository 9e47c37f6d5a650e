"""The registry schema and the audit log, on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError

from coordinator import audit
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry, Base


def test_the_migrations_build_exactly_the_models(db: Database) -> None:
    with db.writer.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)

    assert diff == []


def test_opening_again_migrates_nothing_and_keeps_the_chain(db: Database) -> None:
    # Prepare
    with db.write() as session:
        audit.append(session, "olga", "site.add", "st-marys", note="first")

    # Execute
    again = Database.open(db.url)
    with again.read() as session:
        result = audit.verify(session)
    again.close()

    # Assert
    assert result.ok and result.entries == 1


def test_audit_entries_chain_and_verify(db: Database) -> None:
    # Execute
    with db.write() as session:
        first = audit.append(session, "olga", "site.add", "st-marys")
        second = audit.append(session, "cli", "token.create", "rita", role="researcher")
    with db.read() as session:
        result = audit.verify(session)
        rows = session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).all()

    # Assert
    assert result.ok and result.entries == 2
    assert [r.seq for r in rows] == [1, 2]
    assert second.prev_hash == first.hash
    assert rows[1].details == '{"role":"researcher"}'


def test_a_failed_transaction_leaves_no_entry(db: Database) -> None:
    with pytest.raises(RuntimeError), db.write() as session:
        audit.append(session, "olga", "site.add", "ghost")
        raise RuntimeError("the thing being audited failed")

    with db.read() as session:
        assert audit.verify(session).entries == 0


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_log SET actor = 'mallory' WHERE seq = 1", "DELETE FROM audit_log WHERE seq = 2"],
)
def test_the_database_refuses_edits_of_the_log(db: Database, statement: str) -> None:
    with db.write() as session:
        audit.append(session, "olga", "site.add", "a")
        audit.append(session, "olga", "site.add", "b")

    with pytest.raises(DBAPIError, match="append-only"), db.write() as session:
        session.execute(text(statement))

    with db.read() as session:
        assert audit.verify(session).ok


def _drop_guards(db: Database) -> None:
    """What someone with the database's owner rights could do."""
    with db.write() as session:
        if db.dialect == "postgresql":
            session.execute(text("DROP TRIGGER audit_log_append_only ON audit_log"))
        else:
            session.execute(text("DROP TRIGGER audit_log_no_update"))
            session.execute(text("DROP TRIGGER audit_log_no_delete"))


@pytest.mark.parametrize(
    ("statement", "broken_at", "reason"),
    [
        ("UPDATE audit_log SET details = '{}' WHERE seq = 2", 2, "content does not match its hash"),
        ("DELETE FROM audit_log WHERE seq = 2", 2, "entry 2 is missing"),
        ("DELETE FROM audit_log WHERE seq = 3", 3, "entry 3 is missing"),  # the tail
    ],
)
def test_verify_names_the_first_entry_that_was_tampered_with(
    db: Database, statement: str, broken_at: int, reason: str
) -> None:
    # Prepare
    with db.write() as session:
        for subject in ("a", "b", "c"):
            audit.append(session, "olga", "site.add", subject, n=subject)
    _drop_guards(db)

    # Execute
    with db.write() as session:
        session.execute(text(statement))
    with db.read() as session:
        result = audit.verify(session)

    # Assert
    assert not result.ok
    assert (result.broken_at, result.reason) == (broken_at, reason)


def test_concurrent_writers_never_fork_the_chain(db: Database) -> None:
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            for i in range(15):
                with db.write() as session:
                    audit.append(session, name, "upload.open", f"{name}-{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f"site{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    with db.read() as session:
        result = audit.verify(session)
    assert result.ok and result.entries == 60

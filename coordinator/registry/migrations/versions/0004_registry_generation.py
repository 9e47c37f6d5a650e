"""The registry generation: one counter bumped by triggers on every write the registry reads see.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 20:30:00.000000

``coordinator.registry.cache`` keys search, exam and statistics answers by
``registry_generation.value``. Triggers keep it honest whatever writes — the
server, a CLI process, a future code path — and roll back with the write.

- SQLite: row triggers (one ``UPDATE`` per changed row; writers hold the
  database lock anyway, ``BEGIN IMMEDIATE``).
- PostgreSQL: statement triggers calling one function, which locks
  ``audit_head`` before the counter row: every writer of the audit log locks
  ``audit_head`` first, so the two row locks are always taken in one order and
  no two transactions can deadlock on them.

A SQLite ``batch_alter_table`` that rebuilds one of these tables drops its
triggers: a later migration that does so must create them again
(``create_triggers``); ``tests/unit/coordinator/test_registry_cache.py`` checks
that every table has them at head.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: Table -> the change that counts (sites: only a new name, not heartbeats).
WATCHED = {
    "exams": None,
    "series": None,
    "instances": None,
    "labels": None,
    "clinical_values": None,
    "sites": "name",
}


def create_triggers() -> None:
    """The generation triggers on every ``WATCHED`` table (dialect-specific)."""
    bump = "UPDATE registry_generation SET value = value + 1 WHERE id = 1"
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION registry_generation_bump() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN "
            "PERFORM 1 FROM audit_head WHERE id = 1 FOR UPDATE; "
            f"{bump}; RETURN NULL; END $$"
        )
        for table, column in WATCHED.items():
            change = f"UPDATE OF {column}" if column else "UPDATE"
            events = f"INSERT OR {change} OR DELETE" + ("" if column else " OR TRUNCATE")
            op.execute(
                f"CREATE TRIGGER registry_generation_{table} AFTER {events} ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION registry_generation_bump()"
            )
        return
    for table, column in WATCHED.items():
        change = f"UPDATE OF {column}" if column else "UPDATE"
        for event in ("INSERT", change, "DELETE"):
            name = f"registry_generation_{table}_{event.split()[0].lower()}"
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW BEGIN {bump}; END"
            )


def drop_triggers() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in WATCHED:
            op.execute(f"DROP TRIGGER IF EXISTS registry_generation_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS registry_generation_bump()")
        return
    for table in WATCHED:
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS registry_generation_{table}_{event}")


def upgrade() -> None:
    op.create_table(
        "registry_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO registry_generation (id, value) VALUES (1, 0)")
    create_triggers()


def downgrade() -> None:
    drop_triggers()
    op.drop_table("registry_generation")

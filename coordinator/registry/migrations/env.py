"""Alembic environment: migrations run on the connection ``registry.db.migrate`` passes."""

from __future__ import annotations

from alembic import context

from coordinator.registry.models import Base

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - migrations only run through db.migrate
    raise RuntimeError("run migrations through coordinator.registry.db.migrate")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()

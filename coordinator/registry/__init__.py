"""The coordinator's registry: SQLAlchemy 2 tables, Alembic migrations, SQLite or PostgreSQL."""

"""The node's index: what it has seen and where every study stands.

``models`` are the SQLite tables (SQLAlchemy 2), ``db`` opens and migrates the
database (Alembic), ``lifecycle`` is the study state machine, ``audit`` the
hash-chained audit log, ``store`` the index operations intake and the API use.
"""

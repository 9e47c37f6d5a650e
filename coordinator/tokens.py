"""API tokens of operators and researchers: shown once, stored as a SHA-256 hash.

A token is 32 random bytes, so a plain hash is enough to keep it from anyone
reading the database (no password stretching is needed for random secrets).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, select

from coordinator import audit
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import ApiToken
from protocols.sqltypes import utcnow

ROLES = ("operator", "researcher")
PREFIX = "rfc_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create(db: Database, name: str, role: str, actor: str) -> str:
    """A new token for ``name`` with ``role``; the only time it is shown."""
    if role not in ROLES:
        raise CoordinatorError("bad_role", f'Argument "role" must be one of {", ".join(ROLES)}.')
    if not name or len(name) > 64 or not name.isprintable():
        raise CoordinatorError("bad_name", 'Argument "name" must be 1-64 printable characters.')
    token = PREFIX + secrets.token_urlsafe(32)
    with db.write() as session:
        if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
            raise CoordinatorError("token_exists", f"a token named {name} exists; revoke it first")
        session.add(ApiToken(name=name, role=role, token_hash=token_hash(token)))
        audit.append(session, actor, "token.create", name, role=role)
    return token


def revoke(db: Database, name: str, actor: str) -> None:
    with db.write() as session:
        row = session.scalar(
            select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
        )
        if row is None:
            raise CoordinatorError("token_not_found", f"no active token named {name}")
        row.revoked_at = utcnow()
        # The name is free again; the hash stays unique, so the old token stays dead.
        row.name = f"{name[:40]}#revoked-{row.id}"
        audit.append(session, actor, "token.revoke", name)


#: A token used after this long unused starts a new session: a "login" in the audit log.
SESSION_GAP = dt.timedelta(hours=1)


def check(db: Database, token: str, connection: Connection | None = None) -> tuple[str, str] | None:
    """(name, role) of an active token, None otherwise; a new session is audited as a login.

    The token is looked up on ``connection`` when given (a caller reading more on
    the same connection saves a checkout and a transaction), else on a pooled one.
    """
    if not token.startswith(PREFIX):
        return None
    digest = token_hash(token)
    # A Core read, not an ORM session: it runs on every request (a quarter of the CPU
    # of a session's; bench/load_coordinator.py).
    query = select(ApiToken.name, ApiToken.role, ApiToken.last_used_at).where(
        ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None)
    )
    if connection is not None:
        row = connection.execute(query).first()
    else:
        with db.reader.connect() as own:
            row = own.execute(query).first()
    if row is None:
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > SESSION_GAP:
        with db.write() as session:
            stored = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
            if stored is not None and (
                stored.last_used_at is None or now - stored.last_used_at > SESSION_GAP
            ):
                stored.last_used_at = now
                audit.append(session, row.name, "login", row.name, role=row.role, via="api token")
    return (row.name, row.role)


@dataclass(frozen=True)
class Holder:
    """The person an active API token belongs to (``id`` is the token's row)."""

    id: int
    name: str
    role: str


def sign_in(db: Database, token: str, via: str) -> Holder | None:
    """The holder of an active token signing in to a session (``via`` the web UI); audited.

    Unlike ``check`` every sign-in is a login in the audit log: a person chose to
    start a session.
    """
    token = token.strip()
    if not token.startswith(PREFIX):
        return None
    digest = token_hash(token)
    active = ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None)
    with db.read() as session:
        if session.scalar(select(ApiToken.id).where(*active)) is None:
            return None  # a wrong token takes no write lock
    with db.write() as session:
        row = session.scalar(select(ApiToken).where(*active))
        if row is None:  # revoked in between
            return None
        row.last_used_at = utcnow()
        audit.append(session, row.name, "login", row.name, role=row.role, via=via)
        return Holder(row.id, row.name, row.role)


def holder(db: Database, token_id: int) -> Holder | None:
    """The holder of token ``token_id`` while it is active (a session re-checks it)."""
    with db.read() as session:
        row = session.execute(
            select(ApiToken.id, ApiToken.name, ApiToken.role).where(
                ApiToken.id == token_id, ApiToken.revoked_at.is_(None)
            )
        ).first()
    return None if row is None else Holder(row.id, row.name, row.role)

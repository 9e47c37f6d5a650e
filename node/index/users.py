"""People who log in to the node's web UI: reviewers and operators, passwords hashed with scrypt."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from sqlalchemy import select

from node.errors import NodeError
from node.index import audit
from node.index.models import User, utcnow
from node.index.store import NodeIndex

ROLES = ("reviewer", "operator")
_N, _R, _P = 2**14, 8, 1
MIN_PASSWORD = 10


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    encoded = (base64.b64encode(salt).decode(), base64.b64encode(digest).decode())
    return f"scrypt${_N}${_R}${_P}${encoded[0]}${encoded[1]}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode("utf-8"),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, expected)


def create_user(index: NodeIndex, name: str, role: str, password: str, actor: str) -> None:
    if role not in ROLES:
        raise NodeError("bad_role", f'Argument "role" must be one of {", ".join(ROLES)}.')
    if not name or len(name) > 64 or not name.replace(".", "").replace("-", "").isalnum():
        raise NodeError("bad_name", 'Argument "name" must be 1-64 letters, digits, "." or "-".')
    if len(password) < MIN_PASSWORD:
        raise NodeError("weak_password", f"a password needs at least {MIN_PASSWORD} characters")
    with index.db.write() as session:
        if session.scalar(select(User).where(User.name == name)) is not None:
            raise NodeError("user_exists", f'a user named "{name}" exists')
        session.add(User(name=name, role=role, password_hash=hash_password(password)))
        audit.append(session, actor, "user.create", name, role=role)


def disable_user(index: NodeIndex, name: str, actor: str) -> None:
    with index.db.write() as session:
        user = session.scalar(select(User).where(User.name == name, User.disabled_at.is_(None)))
        if user is None:
            raise NodeError("user_not_found", f'no active user named "{name}"')
        user.disabled_at = utcnow()
        audit.append(session, actor, "user.disable", name)


def authenticate(index: NodeIndex, name: str, password: str) -> str | None:
    """The role of an active user whose password matches, None otherwise (audited)."""
    with index.db.read() as session:
        user = session.scalar(select(User).where(User.name == name, User.disabled_at.is_(None)))
        stored, role = (user.password_hash, user.role) if user is not None else ("", "")
    # Verify even for unknown users so timing does not tell which names exist.
    ok = verify_password(password, stored or hash_password("x" * MIN_PASSWORD)) and bool(stored)
    with index.db.write() as session:
        audit.append(session, name[:64] or "?", "login" if ok else "login.failed", "web")
    return role if ok else None


def user_role(index: NodeIndex, name: str) -> str | None:
    with index.db.read() as session:
        return session.scalar(
            select(User.role).where(User.name == name, User.disabled_at.is_(None))
        )

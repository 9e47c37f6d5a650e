"""Web UI sessions: the signed cookie and its CSRF token (``protocols.websession``), and the
coordinator's sign-in with an API token, which a revoked token ends, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import tokens
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry
from coordinator.web.session import Sessions, load_secret
from protocols.websession import SessionSigner

KEY = bytes(range(32))


def test_a_cookie_says_who_signed_in_until_it_expires() -> None:
    signer = SessionSigner(KEY, lifetime=60)

    cookie = signer.issue("ada|lovelace", "operator", bound="7", now=1000)

    user = signer.check(cookie, now=1059)
    assert user is not None
    assert (user.name, user.role, user.expires, user.bound) == (
        "ada|lovelace",
        "operator",
        1060,
        "7",
    )
    assert signer.check(cookie, now=1061) is None


@pytest.mark.parametrize(
    "tamper",
    [
        lambda c: c[:-1] + ("0" if c[-1] != "0" else "1"),  # the signature
        lambda c: (
            base64.urlsafe_b64encode(
                json.dumps(["ada", "operator", 99999999999, "7"]).encode()
            ).decode()
            + "."
            + c.rsplit(".", 1)[1]
        ),  # the payload, keeping the old signature
        lambda c: "",
        lambda c: "no-dot-at-all",
        lambda c: "%%%." + c.rsplit(".", 1)[1],
    ],
)
def test_a_changed_or_broken_cookie_is_nobody(tamper: object) -> None:
    signer = SessionSigner(KEY)
    cookie = signer.issue("ada", "researcher", bound="7")

    assert callable(tamper)
    assert signer.check(tamper(cookie)) is None


def test_another_key_does_not_accept_the_cookie_and_short_keys_are_refused() -> None:
    cookie = SessionSigner(KEY).issue("ada", "operator")

    assert SessionSigner(bytes(32)).check(cookie) is None
    with pytest.raises(ValueError, match='"key"'):
        SessionSigner(b"short")


def test_the_csrf_token_belongs_to_one_session() -> None:
    signer = SessionSigner(KEY)
    mine = signer.check(signer.issue("ada", "operator", bound="1"))
    theirs = signer.check(signer.issue("bob", "operator", bound="2"))
    assert mine is not None and theirs is not None

    token = signer.csrf(mine)

    assert signer.check_csrf(mine, token)
    assert not signer.check_csrf(theirs, token)
    assert not signer.check_csrf(mine, "")
    assert not signer.check_csrf(mine, "é" * 32)  # non-ASCII input is a refusal, not a crash


def test_the_secret_is_made_once_private_and_refused_when_others_can_read_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "home" / "web.secret"

    first = load_secret(path)
    again = load_secret(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    path.chmod(0o644)

    assert first == again and len(first) == 32 and mode == 0o600
    with pytest.raises(CoordinatorError) as exposed:
        load_secret(path)
    assert exposed.value.code == "insecure_secret"


def test_an_api_token_signs_in_and_revoking_it_ends_the_session(
    db: Database, tmp_path: Path
) -> None:
    # Prepare
    sessions = Sessions(db, tmp_path / "web.secret")
    token = tokens.create(db, "olga", "operator", actor="test")

    # Execute
    signed = sessions.sign_in(token)
    wrong = sessions.sign_in("rfc_" + "A" * 43)
    assert signed is not None
    cookie, user = signed
    during = sessions.user(cookie)
    tokens.revoke(db, "olga", actor="test")
    after = sessions.user(cookie)
    again = sessions.sign_in(token)

    # Assert
    assert wrong is None and again is None
    assert user.name == "olga" and user.role == "operator"
    assert during == user
    assert after is None
    with db.read() as session:
        logins = session.scalars(select(AuditEntry).where(AuditEntry.action == "login")).all()
    assert [(e.actor, json.loads(e.details)["via"]) for e in logins] == [("olga", "web ui")]


def test_a_cookie_of_another_token_holder_is_refused(db: Database, tmp_path: Path) -> None:
    # A valid signature over a name that is not the bound token's holder (a reused id).
    sessions = Sessions(db, tmp_path / "web.secret")
    token = tokens.create(db, "rita", "researcher", actor="test")
    signed = sessions.sign_in(token)
    assert signed is not None
    _, user = signed

    forged = sessions.issue("olga", "operator", bound=user.bound)

    assert sessions.user(forged) is None

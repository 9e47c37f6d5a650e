"""Signed session cookies and CSRF tokens for the node's web UI (no server-side state).

A session is ``name|role|expires`` signed with HMAC-SHA256 under a secret kept in
the node home (0600). Every form carries a CSRF token derived from the session,
checked on every POST; cookies are HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from dataclasses import dataclass
from pathlib import Path

from node.deid.keys import load_or_create

COOKIE = "radfed_session"
LIFETIME = 8 * 3600


@dataclass(frozen=True)
class WebUser:
    name: str
    role: str
    expires: int


class Sessions:
    """Issue and check session cookies and CSRF tokens."""

    def __init__(self, keys_dir: Path) -> None:
        self._key = load_or_create(keys_dir / "web.secret")

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def issue(self, name: str, role: str) -> str:
        payload = f"{name}|{role}|{int(time.time()) + LIFETIME}".encode()
        token = base64.urlsafe_b64encode(payload).decode("ascii")
        return f"{token}.{self._sign(payload)}"

    def check(self, cookie: str | None) -> WebUser | None:
        if not cookie or "." not in cookie:
            return None
        token, signature = cookie.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(token.encode("ascii"))
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            name, role, expires = payload.decode("utf-8").split("|")
            deadline = int(expires)
        except ValueError:
            return None
        if deadline < time.time():
            return None
        return WebUser(name, role, deadline)

    def csrf(self, user: WebUser) -> str:
        return self._sign(f"csrf|{user.name}|{user.expires}".encode())[:32]

    def check_csrf(self, user: WebUser, token: str) -> bool:
        return hmac.compare_digest(self.csrf(user), token)

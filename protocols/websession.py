"""Signed session cookies and CSRF tokens for the services' web UIs (no server-side state).

Both the node's and the coordinator's UI sign a session as the JSON list
``[name, role, expires, bound]`` with HMAC-SHA256 under a secret the service
keeps (0600, in its home). ``bound`` ties a session to something the service
checks again on every request where it wants to (the coordinator: the API token
the user signed in with, so revoking the token ends the session). Every form
carries a CSRF token derived from the session and checked on every POST.
Cookies are set HttpOnly and SameSite=Strict by the services.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

#: How long a session lasts (seconds).
LIFETIME = 8 * 3600
#: The shortest secret a signer accepts (bytes).
MIN_KEY_BYTES = 32


@dataclass(frozen=True)
class WebUser:
    """Who a valid session cookie says is signed in, until when, bound to what."""

    name: str
    role: str
    expires: int
    bound: str = ""


class SessionSigner:
    """Issue and check session cookies and CSRF tokens under one secret key."""

    def __init__(self, key: bytes, lifetime: int = LIFETIME) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f'Argument "key" must be at least {MIN_KEY_BYTES} bytes.')
        if lifetime < 1:
            raise ValueError('Argument "lifetime" must be a positive number of seconds.')
        self._key = key
        self.lifetime = lifetime

    def _sign(self, payload: bytes) -> str:
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()

    def issue(self, name: str, role: str, bound: str = "", now: float | None = None) -> str:
        """A cookie value for ``name`` with ``role``, valid for ``lifetime`` seconds."""
        expires = int(time.time() if now is None else now) + self.lifetime
        payload = json.dumps([name, role, expires, bound], separators=(",", ":")).encode("utf-8")
        token = base64.urlsafe_b64encode(payload).decode("ascii")
        return f"{token}.{self._sign(payload)}"

    def check(self, cookie: str | None, now: float | None = None) -> WebUser | None:
        """The user of a cookie this signer issued and that has not expired; else None."""
        if not cookie or "." not in cookie:
            return None
        token, signature = cookie.rsplit(".", 1)
        try:
            payload = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, binascii.Error):
            return None
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode("utf-8")):
            return None
        try:
            name, role, expires, bound = json.loads(payload)
        except (ValueError, TypeError):
            return None
        if not (
            isinstance(name, str)
            and isinstance(role, str)
            and isinstance(expires, int)
            and isinstance(bound, str)
        ):
            return None
        if expires < (time.time() if now is None else now):
            return None
        return WebUser(name, role, expires, bound)

    def csrf(self, user: WebUser) -> str:
        """The CSRF token of ``user``'s session (the same for every form of it)."""
        payload = json.dumps(["csrf", user.name, user.expires, user.bound]).encode("utf-8")
        return self._sign(payload)[:32]

    def check_csrf(self, user: WebUser, token: str) -> bool:
        return hmac.compare_digest(self.csrf(user).encode(), token.encode("utf-8"))

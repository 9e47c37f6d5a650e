"""Signed session cookies and CSRF tokens for the node's web UI (no server-side state).

The signing is ``protocols.websession`` (the coordinator's UI uses the same); the
secret is kept in the node home (0600). Every form carries a CSRF token derived
from the session, checked on every POST; cookies are HttpOnly and SameSite=Strict.
"""

from __future__ import annotations

from pathlib import Path

from node.deid.keys import load_or_create
from protocols.websession import LIFETIME, SessionSigner, WebUser

COOKIE = "radfed_session"

__all__ = ["COOKIE", "LIFETIME", "Sessions", "WebUser"]


class Sessions(SessionSigner):
    """Issue and check the node UI's session cookies and CSRF tokens."""

    def __init__(self, keys_dir: Path) -> None:
        super().__init__(load_or_create(keys_dir / "web.secret"))

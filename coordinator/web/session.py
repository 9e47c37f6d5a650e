"""Sessions of the coordinator's web UI: an API token signs in, a signed cookie carries on.

Operators and researchers have no passwords on the coordinator, only API tokens
(``coordinator.tokens``), so signing in to the UI means pasting one's token
once. The session cookie (``protocols.websession``, HMAC-signed, no server
state) names the token's row, and every request checks that the token is still
active: revoking a token ends its sessions at once. The signing secret lives in
the coordinator home (0600) and is made on first use.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from coordinator import tokens
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from protocols.websession import MIN_KEY_BYTES, SessionSigner, WebUser

#: Not the node UI's name: both may run on one host, and cookies ignore ports.
COOKIE = "radfed_coordinator_session"
#: The cookie goes to the UI's pages only, never to the API.
COOKIE_PATH = "/ui"


def load_secret(path: Path) -> bytes:
    """The UI's signing secret at ``path``, created (random, 0600) if it is not there."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: two processes starting at once agree on whichever wrote first.
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(MIN_KEY_BYTES) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CoordinatorError(
            "insecure_secret",
            f"{path} is readable by other users (mode {info.st_mode & 0o777:o}); "
            f"run: chmod 600 {path}",
        )
    try:
        key = bytes.fromhex(path.read_text(encoding="ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CoordinatorError("insecure_secret", f"{path} does not hold a hex secret") from exc
    if len(key) < MIN_KEY_BYTES:
        raise CoordinatorError(
            "insecure_secret", f"{path} holds {len(key)} bytes; {MIN_KEY_BYTES} are needed"
        )
    return key


class Sessions(SessionSigner):
    """Sign-in with an API token, and the checks every page request makes."""

    def __init__(self, db: Database, secret_path: Path) -> None:
        super().__init__(load_secret(secret_path))
        self.db = db

    def sign_in(self, token: str) -> tuple[str, WebUser] | None:
        """A cookie value and its user for an active API token; None for any other text."""
        holder = tokens.sign_in(self.db, token, via="web ui")
        if holder is None:
            return None
        cookie = self.issue(holder.name, holder.role, bound=str(holder.id))
        user = self.check(cookie)
        return (cookie, user) if user is not None else None

    def user(self, cookie: str | None) -> WebUser | None:
        """The user of a valid cookie whose API token is still active (its role as now)."""
        user = self.check(cookie)
        if user is None or not user.bound.isdigit():
            return None
        holder = tokens.holder(self.db, int(user.bound))
        if holder is None or holder.name != user.name:
            return None
        return WebUser(holder.name, holder.role, user.expires, user.bound)

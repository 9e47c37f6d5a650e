"""The coordinator's failed-authentication guard (``protocols.api.authguard``).

Scopes, each counted per client address: ``token`` (API tokens, on the API
and at the web UI's sign-in: the same secrets), ``enroll`` (one-time
enrollment tokens) and ``node`` (node-signed request tokens whose signature,
certificate or nonce does not check out). A lockout is refused with
``too_many_attempts`` (HTTP 429, ``Retry-After``), written to the audit log
once (``auth.lockout``, the client's address as subject) and counted in
``/metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from coordinator import audit
from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from protocols.api.authguard import TOO_MANY_ATTEMPTS, AuthGuard
from protocols.bruteforce import Lockout

SCOPES = ("token", "enroll", "node")


def auth_guard(
    settings: CoordinatorSettings, db: Database, registry: CollectorRegistry | None
) -> AuthGuard:
    """The guard of one coordinator process."""

    def refuse(message: str, retry_after: int) -> CoordinatorError:
        return CoordinatorError(TOO_MANY_ATTEMPTS, message, retryable=True, retry_after=retry_after)

    def on_lockout(scope: str, client: str, lockout: Lockout) -> None:
        with db.write() as session:
            audit.append(
                session,
                "auth",
                "auth.lockout",
                client,
                scope=scope,
                failures=lockout.failures,
                seconds=round(lockout.seconds),
                lockout=lockout.strike,
            )

    return AuthGuard(
        settings.lockout_policy,
        settings.trusted_proxies,
        SCOPES,
        refuse,
        on_lockout,
        "radfed_coordinator",
        registry,
    )

"""The node's failed-authentication guard (``protocols.api.authguard``).

Scopes, each counted per client address: ``token`` (API tokens) and
``password`` (the web UI's sign-in). A lockout is refused with
``too_many_attempts`` (HTTP 429, ``Retry-After``; the sign-in page says so),
written to the node's audit log once (``auth.lockout``, the client's address as
subject) and counted in ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry

from node.errors import NodeError
from node.index import audit
from node.index.store import NodeIndex
from protocols.api.authguard import TOO_MANY_ATTEMPTS, AuthGuard
from protocols.bruteforce import Lockout, LockoutPolicy

SCOPES = ("token", "password")


def auth_guard(
    index: NodeIndex,
    policy: LockoutPolicy,
    trusted_proxies: Iterable[str] = (),
    registry: CollectorRegistry | None = None,
) -> AuthGuard:
    """The guard of one node process."""

    def refuse(message: str, retry_after: int) -> NodeError:
        return NodeError(TOO_MANY_ATTEMPTS, message, retryable=True, retry_after=retry_after)

    def on_lockout(scope: str, client: str, lockout: Lockout) -> None:
        with index.db.write() as session:
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

    return AuthGuard(policy, trusted_proxies, SCOPES, refuse, on_lockout, "radfed_node", registry)

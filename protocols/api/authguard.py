"""The failed-authentication limiter as both services use it around every secret they check.

A service makes one ``AuthGuard`` (its settings' ``LockoutPolicy`` and
``trusted_proxies``, its own error type, audit and metrics registry) and wraps
each check of a presented secret::

    with guard.attempt(request, "token") as attempt:   # refused while locked out
        if not right(secret):
            attempt.failed()                            # counted; audited at a lockout
            raise ServiceError("unauthorized", ...)
        attempt.succeeded()

The key is ``scope:client``, the client being ``protocols.bruteforce.client_address``
of the request; scopes keep kinds of secrets apart where one client
legitimately presents several (a node's signed requests and an operator's
token behind one hospital NAT). A locked-out attempt raises the service's error
(code ``too_many_attempts``, HTTP 429 with ``Retry-After``); a lockout is
handed to ``on_lockout`` once (the service audits it) and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from types import TracebackType

from prometheus_client import CollectorRegistry, Counter
from starlette.requests import HTTPConnection

from protocols.bruteforce import (
    Attempt,
    FailureLimiter,
    LockedOutError,
    Lockout,
    LockoutPolicy,
    client_address,
    parse_networks,
)

log = logging.getLogger("radfed.auth")

#: The error code of a locked-out attempt (HTTP 429).
TOO_MANY_ATTEMPTS = "too_many_attempts"


class GuardedAttempt:
    """One attempt at a secret, for one client and scope (see the module docstring)."""

    def __init__(self, guard: AuthGuard, scope: str, client: str, attempt: Attempt) -> None:
        self._guard = guard
        self.scope = scope
        self.client = client
        self._attempt = attempt

    def failed(self) -> None:
        """The secret was wrong: count it (and audit the lockout it may start)."""
        lockout = self._attempt.failed()
        self._guard.failures.labels(self.scope).inc()
        if lockout is not None:
            self._guard.locked_out(self.scope, self.client, lockout)

    def succeeded(self) -> None:
        self._attempt.succeeded()

    def __enter__(self) -> GuardedAttempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._attempt.release()


class AuthGuard:
    """A service's failed-authentication limiter, audited and counted."""

    def __init__(
        self,
        policy: LockoutPolicy,
        trusted_proxies: Iterable[str],
        scopes: Iterable[str],
        refuse: Callable[[str, int], Exception],
        on_lockout: Callable[[str, str, Lockout], None],
        metric_prefix: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.limiter = FailureLimiter(policy)
        self.proxies = parse_networks(trusted_proxies)
        self._refuse = refuse
        self._on_lockout = on_lockout
        self.failures = Counter(
            f"{metric_prefix}_auth_failures",
            "Failed authentications (a wrong secret presented), by scope.",
            ["scope"],
            registry=registry,
        )
        self.lockouts = Counter(
            f"{metric_prefix}_auth_lockouts",
            "Clients locked out after too many failed authentications, by scope.",
            ["scope"],
            registry=registry,
        )
        for scope in scopes:
            self.failures.labels(scope)
            self.lockouts.labels(scope)

    def client(self, connection: HTTPConnection) -> str:
        """The address ``connection`` counts against (see ``client_address``)."""
        peer = connection.client.host if connection.client is not None else None
        return client_address(peer, connection.headers.getlist("x-forwarded-for"), self.proxies)

    def attempt(self, connection: HTTPConnection, scope: str) -> GuardedAttempt:
        """Begin an attempt, or raise the service's ``too_many_attempts`` error."""
        client = self.client(connection)
        try:
            attempt = self.limiter.attempt(f"{scope}:{client}")
        except LockedOutError as exc:
            message = (
                f"too many failed authentications from {client}; try again in {exc.retry_after} s"
            )
            raise self._refuse(message, exc.retry_after) from None
        return GuardedAttempt(self, scope, client, attempt)

    def locked_out(self, scope: str, client: str, lockout: Lockout) -> None:
        self.lockouts.labels(scope).inc()
        log.warning(
            "locked out %s (%s) for %.0f s after %d failed authentications (lockout %d)",
            client,
            scope,
            lockout.seconds,
            lockout.failures,
            lockout.strike,
        )
        try:
            self._on_lockout(scope, client, lockout)
        except Exception:  # the lockout holds even if its audit entry could not be written
            log.exception("could not audit the lockout of %s", client)

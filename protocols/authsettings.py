"""The settings both services share for failed authentications and proxies.

``CoordinatorSettings`` and ``NodeSettings`` take these fields from
``AuthSettings`` (each under its own environment prefix): who counts as the
client (``trusted_proxies``) and when failed authentications lock it out
(``protocols.bruteforce``).
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, Field, field_validator, model_validator

from protocols.bruteforce import LockoutPolicy, parse_networks


class AuthSettings(BaseModel):
    """Failed-authentication limits and trusted proxies of a service."""

    #: Proxies (addresses or networks) whose ``X-Forwarded-For`` names the client; from
    #: anyone else the header is ignored and the socket peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Failed authentications (a wrong token, password, enrollment token or node
    #: signature) one client address may make within ``auth_window_s`` ...
    auth_max_failures: int = Field(default=10, ge=1)
    auth_window_s: float = Field(default=300.0, gt=0)
    #: ... before it is locked out for ``auth_lockout_s``, doubled at each further lockout
    #: up to ``auth_max_lockout_s``; while locked out even right credentials are refused.
    auth_lockout_s: float = Field(default=900.0, gt=0)
    auth_max_lockout_s: float = Field(default=14400.0, gt=0)
    #: Client addresses remembered at most (least recently seen forgotten first).
    auth_tracked_clients: int = Field(default=10_000, ge=100)

    @field_validator("trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        parse_networks(value)  # a bad entry names itself
        return value

    @model_validator(mode="after")
    def _lockouts(self) -> Self:
        if self.auth_max_lockout_s < self.auth_lockout_s:
            raise ValueError("auth_max_lockout_s must be at least auth_lockout_s")
        return self

    @property
    def lockout_policy(self) -> LockoutPolicy:
        """When failed authentications lock a client out (``protocols.bruteforce``)."""
        return LockoutPolicy(
            max_failures=self.auth_max_failures,
            window_s=self.auth_window_s,
            lockout_s=self.auth_lockout_s,
            max_lockout_s=self.auth_max_lockout_s,
            max_clients=self.auth_tracked_clients,
        )

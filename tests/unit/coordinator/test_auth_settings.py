"""The coordinator's failed-authentication settings: defaults, the policy they make, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from coordinator.settings import load_settings
from protocols.bruteforce import LockoutPolicy


def test_the_defaults_make_the_documented_policy(tmp_path: Path) -> None:
    settings = load_settings(tmp_path)

    assert settings.lockout_policy == LockoutPolicy(
        max_failures=10, window_s=300, lockout_s=900, max_lockout_s=14400, max_clients=10_000
    )
    assert settings.trusted_proxies == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"trusted_proxies": ["10.0.0.0/8", "proxy.example.org"]}, "proxy.example.org"),
        ({"auth_lockout_s": 600, "auth_max_lockout_s": 60}, "auth_max_lockout_s"),
        ({"auth_max_failures": 0}, "auth_max_failures"),
    ],
)
def test_a_bad_value_is_refused_by_name(
    tmp_path: Path, overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        load_settings(tmp_path, **overrides)

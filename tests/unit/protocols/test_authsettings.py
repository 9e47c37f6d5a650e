"""The failed-authentication settings both services take from ``protocols.authsettings``:
defaults, the policy they make, bad values — as each service loads them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from coordinator.settings import load_settings as coordinator_settings
from node.settings import load_settings as node_settings
from protocols.bruteforce import LockoutPolicy

LOADERS = pytest.mark.parametrize(
    "load", [coordinator_settings, node_settings], ids=["coordinator", "node"]
)


@LOADERS
def test_the_defaults_make_the_documented_policy(tmp_path: Path, load: Callable[..., Any]) -> None:
    settings = load(tmp_path)

    assert settings.lockout_policy == LockoutPolicy(
        max_failures=10, window_s=300, lockout_s=900, max_lockout_s=14400, max_clients=10_000
    )
    assert settings.trusted_proxies == []


@LOADERS
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"trusted_proxies": ["10.0.0.0/8", "proxy.example.org"]}, "proxy.example.org"),
        ({"auth_lockout_s": 600, "auth_max_lockout_s": 60}, "auth_max_lockout_s"),
        ({"auth_max_failures": 0}, "auth_max_failures"),
    ],
)
def test_a_bad_value_is_refused_by_name(
    tmp_path: Path, load: Callable[..., Any], overrides: dict[str, object], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        load(tmp_path, **overrides)

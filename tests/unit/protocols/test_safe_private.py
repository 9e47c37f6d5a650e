"""The site's safe-private allowlist file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE, SafePrivateError, load_allowlist


def test_site_entries_extend_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "allow.json"
    path.write_text(
        json.dumps([{"creator": "ACME 1.0", "group": "0019", "element": "1A", "vr": "DS"}])
    )

    keys = load_allowlist(path)

    assert ("ACME 1.0", 0x0019, 0x1A, "DS") in keys
    assert keys >= DEFAULT_SAFE_PRIVATE


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"creator": "X"}, "must be a JSON list"),
        ([{"creator": "X", "group": "0019"}], "entry 0: needs creator"),
        ([{"creator": "X", "group": "0018", "element": "01", "vr": "DS"}], "is not private"),
        ([{"creator": "X", "group": "0019", "element": "1001", "vr": "DS"}], "element must be"),
        ([{"creator": "X", "group": "0019", "element": "01", "vr": "SQ"}], 'VR "SQ"'),
        ([{"creator": "X", "group": "0019", "element": "01", "vr": "ZZ"}], 'VR "ZZ"'),
    ],
)
def test_bad_entries_are_named(tmp_path: Path, entries: object, message: str) -> None:
    path = tmp_path / "allow.json"
    path.write_text(json.dumps(entries))

    with pytest.raises(SafePrivateError, match=message):
        load_allowlist(path)


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SafePrivateError, match="Cannot read"):
        load_allowlist(tmp_path / "missing.json")

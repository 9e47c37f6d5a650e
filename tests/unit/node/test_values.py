"""Keyed pseudonyms, UIDs and date shifts; dummies."""

from __future__ import annotations

import uuid

import pytest

from node.deid.values import Keyed, ReplacementError, dummy, is_uid, pad, shift_dates

SECRET = b"s" * 32


def test_pseudonym_is_deterministic_site_prefixed_and_keyed() -> None:
    keyed, other_site = Keyed(SECRET, "SITEA"), Keyed(b"t" * 32, "SITEA")

    first, again = keyed.pseudonym(b"id:MRN1"), Keyed(SECRET, "SITEA").pseudonym(b"id:MRN1")

    assert first == again
    assert first.startswith(b"SITEA-") and len(first) == 18
    assert first != keyed.pseudonym(b"id:MRN2")
    assert first != other_site.pseudonym(b"id:MRN1")


def test_uid_is_a_version_8_uuid_under_2_25() -> None:
    keyed = Keyed(SECRET, "SITE")

    mapped = keyed.uid(b"1.2.3.4")

    assert mapped.startswith(b"2.25.") and is_uid(mapped) and len(mapped) <= 64
    as_uuid = uuid.UUID(int=int(mapped[5:]))
    assert as_uuid.version == 8 and as_uuid.variant == uuid.RFC_4122
    assert keyed.uid(b"1.2.3.4") == mapped != keyed.uid(b"1.2.3.5")


def test_shift_is_constant_per_patient_and_within_bounds() -> None:
    keyed = Keyed(SECRET, "SITE", 365, 3652)
    shifts = {keyed.shift_days(f"id:{n}".encode()) for n in range(200)}

    assert all(-3652 <= s <= -365 for s in shifts)
    assert len(shifts) > 150  # spread, not one constant for everybody
    assert keyed.shift_days(b"id:7") == keyed.shift_days(b"id:7")


@pytest.mark.parametrize(
    ("vr", "raw", "days", "expected"),
    [
        ("DA", b"20200315", -10, b"20200305"),
        ("DA", b"2020.03.15", -10, b"20200305"),  # ACR-NEMA form comes out standard
        ("DA", b"20200315\\20200401", -1, b"20200314\\20200331 "),
        ("DA", b"20200101 ", -1, b"20191231"),
        ("DT", b"20200315101010.123456+0100", -365, b"20190316101010.123456+0100"),
        ("DT", b"2020", -400, b"2018"),
        ("DT", b"202003", -31, b"202001"),
        ("DA", b"", -5, b""),
    ],
)
def test_dates_shift_by_whole_days(vr: str, raw: bytes, days: int, expected: bytes) -> None:
    assert shift_dates(raw, vr, days) == expected


@pytest.mark.parametrize("raw", [b"2020-03-15", b"JOHN", b"20201399", b"\xff\xfe"])
def test_unparseable_dates_are_refused(raw: bytes) -> None:
    with pytest.raises(ReplacementError):
        shift_dates(raw, "DA", -1)


@pytest.mark.parametrize(
    "vr",
    [
        "AE",
        "AS",
        "CS",
        "DA",
        "DS",
        "DT",
        "IS",
        "LO",
        "LT",
        "PN",
        "SH",
        "ST",
        "TM",
        "UT",
        "FD",
        "FL",
        "OB",
        "OW",
        "SL",
        "SS",
        "UL",
        "US",
    ],
)
def test_dummies_are_even_and_non_empty(vr: str) -> None:
    value = dummy(vr)

    assert value and len(value) % 2 == 0


def test_padding_follows_the_vr() -> None:
    assert pad(b"1.2.3", "UI") == b"1.2.3\x00"
    assert pad(b"ABC", "LO") == b"ABC "
    assert pad(b"AB", "LO") == b"AB"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"secret": b"short"}, "at least 32 bytes"),
        ({"site_prefix": "bad prefix"}, "Site prefix"),
        ({"shift_min_days": 10, "shift_max_days": 5}, "Date shift bounds"),
    ],
)
def test_bad_keyed_arguments_are_named(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"secret": SECRET, "site_prefix": "SITE", **kwargs}
    with pytest.raises(ValueError, match=message):
        Keyed(**args)  # type: ignore[arg-type]

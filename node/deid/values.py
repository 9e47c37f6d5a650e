"""Keyed, deterministic replacement values: pseudonyms, UIDs, date shifts, dummies.

Everything derives from the site secret with HMAC-SHA256, so the same input
gives the same output on every run and on every worker process, and a
patient's later exams link to the earlier ones without a lookup table.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
from typing import Final

from protocols.deid.dictionary import STANDARD_UIDS

_UID_SYNTAX: Final = re.compile(rb"^[0-9]+(\.[0-9]+)*$")
_SITE_PREFIX: Final = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,15}$")

#: Dummy values (action D) by VR; numbers are zero, dates the epoch of DICOM dummies.
DUMMY_TEXT: Final[dict[str, bytes]] = {
    "AE": b"ANONYMOUS",
    "AS": b"000Y",
    "CS": b"ANONYMIZED",
    "DA": b"19000101",
    "DS": b"0",
    "DT": b"19000101000000",
    "IS": b"0",
    "LO": b"ANONYMIZED",
    "LT": b"ANONYMIZED",
    "PN": b"ANONYMIZED",
    "SH": b"ANONYMIZED",
    "ST": b"ANONYMIZED",
    "TM": b"000000",
    "UC": b"ANONYMIZED",
    "UT": b"ANONYMIZED",
}
DUMMY_BINARY_SIZE: Final[dict[str, int]] = {
    "AT": 4,
    "FD": 8,
    "FL": 4,
    "OB": 2,
    "OD": 8,
    "OF": 4,
    "OL": 4,
    "OV": 8,
    "OW": 2,
    "SL": 4,
    "SS": 2,
    "SV": 8,
    "UL": 4,
    "UN": 2,
    "US": 2,
    "UV": 8,
}


class ReplacementError(ValueError):
    """A value that cannot be replaced safely (the caller removes it instead)."""


def pad(value: bytes, vr: str) -> bytes:
    """Pad to even length: UIDs and binary with NUL, text with a space."""
    if len(value) % 2 == 0:
        return value
    if vr in ("UI", "OB", "UN") or vr in DUMMY_BINARY_SIZE:
        return value + b"\x00"
    return value + b" "


def dummy(vr: str) -> bytes:
    """A non-empty value that carries nothing, valid for the VR."""
    text = DUMMY_TEXT.get(vr)
    if text is not None:
        return pad(text, vr)
    size = DUMMY_BINARY_SIZE.get(vr)
    if size is not None:
        return b"\x00" * size
    if vr == "UR":
        return b""
    return pad(b"ANONYMIZED", vr)


class Keyed:
    """The keyed functions of one site: pseudonyms, UIDs and date shifts."""

    def __init__(
        self,
        secret: bytes,
        site_prefix: str,
        shift_min_days: int = 365,
        shift_max_days: int = 3652,
    ) -> None:
        if len(secret) < 32:
            raise ValueError("The site secret must be at least 32 bytes.")
        if not _SITE_PREFIX.match(site_prefix):
            raise ValueError(
                f'Site prefix "{site_prefix}" must be 1-16 characters of A-Z, 0-9 and "-".'
            )
        if not 1 <= shift_min_days <= shift_max_days:
            raise ValueError("Date shift bounds must satisfy 1 <= min <= max days.")
        self._secret = secret
        self.site_prefix = site_prefix
        self._shift_min = shift_min_days
        self._shift_span = shift_max_days - shift_min_days + 1
        self._uid_cache: dict[bytes, bytes] = {}

    def _digest(self, purpose: bytes, value: bytes) -> bytes:
        return hmac.new(self._secret, purpose + b"\x00" + value, hashlib.sha256).digest()

    def pseudonym(self, patient_key: bytes) -> bytes:
        """Site-prefixed pseudonym, e.g. ``SITE-7K2M4Q9X1ABC`` (valid LO and PN)."""
        code = base64.b32encode(self._digest(b"pseudonym", patient_key)).decode("ascii")
        return f"{self.site_prefix}-{code[:12]}".encode("ascii")

    def shift_days(self, patient_key: bytes) -> int:
        """Whole days every date of this patient moves back (always negative)."""
        n = int.from_bytes(self._digest(b"dateshift", patient_key)[:8], "big")
        return -(self._shift_min + n % self._shift_span)

    def uid(self, original: bytes) -> bytes:
        """``2.25.<integer>`` of a version-8 UUID keyed on the original UID."""
        found = self._uid_cache.get(original)
        if found is not None:
            return found
        raw = bytearray(self._digest(b"uid", original)[:16])
        raw[6] = (raw[6] & 0x0F) | 0x80  # UUID version 8 (RFC 9562, custom)
        raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
        mapped = b"2.25." + str(int.from_bytes(raw, "big")).encode("ascii")
        if len(self._uid_cache) > 4096:
            self._uid_cache.clear()  # bounded: memory stays flat over any run
        self._uid_cache[original] = mapped
        return mapped


def is_standard_uid(uid: bytes) -> bool:
    """A registered UID of the standard (SOP class, transfer syntax, ...)."""
    try:
        return uid.decode("ascii") in STANDARD_UIDS
    except UnicodeDecodeError:
        return False


def is_uid(value: bytes) -> bool:
    """Syntactically a UID: digits and dots, at most 64 characters."""
    return len(value) <= 64 and _UID_SYNTAX.match(value) is not None


def split_values(raw: bytes) -> list[bytes]:
    """Backslash-separated values with DICOM padding stripped."""
    return [v.strip(b" \x00") for v in raw.split(b"\\")]


def _shift_date(value: bytes, days: int) -> bytes:
    text = value.decode("ascii")
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA YYYY.MM.DD
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        raise ReplacementError(f"not a date: {value!r}")
    day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    try:
        return (day + dt.timedelta(days=days)).strftime("%Y%m%d").encode("ascii")
    except OverflowError as exc:
        raise ReplacementError(f"date out of range: {value!r}") from exc


def _shift_datetime(value: bytes, days: int) -> bytes:
    text = value.decode("ascii")
    zone = ""
    for sign in "+-":
        at = text.find(sign, 4)
        if at != -1:
            text, zone = text[:at], text[at:]
            break
    digits = text.split(".")[0]
    if not digits.isdigit() or len(digits) < 4:
        raise ReplacementError(f"not a datetime: {value!r}")
    precision = len(digits)
    year = int(digits[:4])
    month = int(digits[4:6]) if precision >= 6 else 1
    day = int(digits[6:8]) if precision >= 8 else 1
    shifted = (dt.date(year, month, day) + dt.timedelta(days=days)).strftime("%Y%m%d")
    # Keep the original precision; a year-only value moves with the shifted year.
    head = shifted[: min(precision, 8)]
    rest = text[8:] if precision >= 8 else ""
    return (head + rest + zone).encode("ascii")


def shift_dates(raw: bytes, vr: str, days: int) -> bytes:
    """Shift every value of a DA or DT element by whole days; raises on garbage."""
    shift = _shift_date if vr == "DA" else _shift_datetime
    out: list[bytes] = []
    for value in split_values(raw):
        if not value:
            out.append(b"")
            continue
        try:
            out.append(shift(value, days))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ReplacementError(str(exc)) from exc
    return pad(b"\\".join(out), vr)

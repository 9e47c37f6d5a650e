"""Scan a de-identified instance for residual PHI; report findings, never fix anything.

The scanner does not trust the de-identifier. It parses with pydicom (not the
node's reader) and decides what every element should look like from the shared
compiled profile (``protocols.deid.profile``): every element at every depth,
private elements, the file meta and the raw bytes of the file. The node passes
what it knows about the originals (:class:`Originals`, from its vault); the
coordinator passes ``None`` and checks what can be checked without them.

Finding kinds (stable): ``unreadable``, ``malformed``, ``not_removed``,
``not_emptied``, ``not_replaced``, ``person_name``, ``original_uid``,
``original_value``, ``date_not_shifted``, ``identifier_pattern``,
``private_not_allowed``, ``file_meta``, ``method_attributes``.
"""

from __future__ import annotations

import datetime as dt
import importlib
import re
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.datadict import private_dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from protocols.deid.dictionary import STANDARD_UIDS, dictionary_vr
from protocols.deid.options import CLEAN_PIXEL_DATA_CODE, DeidOptions
from protocols.deid.profile import (
    GENERATED_TAGS,
    PATIENT_ID,
    PATIENT_NAME,
    CompiledProfile,
    Outcome,
    compile_profile,
    iod_index,
    required_type,
    resolve,
)
from protocols.deid.safe_private import DEFAULT_SAFE_PRIVATE, SafePrivateKey
from protocols.phi.findings import PhiFinding, Severity

try:  # a C Aho-Corasick automaton when installed; plain substring search otherwise
    _AHOCORASICK: Any = importlib.import_module("ahocorasick")
except ImportError:  # pragma: no cover - exercised only without the dev extra
    _AHOCORASICK = None

PIXEL_DATA: Final = 0x7FE00010
SOP_CLASS_UID: Final = 0x00080016
SOP_INSTANCE_UID: Final = 0x00080018
ENCAPSULATED_DOCUMENT: Final = 0x00420011
PATIENT_IDENTITY_REMOVED: Final = 0x00120062
METHOD_CODE_SEQUENCE: Final = 0x00120064
TEMPORAL_MODIFIED: Final = 0x00280303
UNDEFINED_LENGTH: Final = 0xFFFFFFFF
#: Values above this size are not read again when the structure is verified.
DEFER: Final = 4096

#: File meta elements a rebuilt group 0002 may hold; anything else came from the source.
ALLOWED_META: Final = frozenset(
    {0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}
)
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
#: A deflated data set inflating past this is not read: a few kilobytes of deflate can
#: claim gigabytes (a "deflate bomb"), and pydicom inflates the whole data set at once.
MAX_INFLATED: Final = 256 << 20

#: The dummy value of each VR (action D): what PS3.15 lets a replaced value be.
DUMMY_TEXT: Final[dict[str, str]] = {
    "AE": "ANONYMOUS",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "TM": "000000",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
}
NUMBER_VRS: Final = frozenset({"DS", "IS", "FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "AT"})
BINARY_VRS: Final = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
STRING_VRS: Final = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
#: Text where identifiers are looked for (numbers, codes and UIDs are not).
PATTERN_VRS: Final = frozenset({"LO", "SH", "LT", "ST", "UT", "UC", "PN", "AE"})
#: Coded-concept attributes: their digit strings are codes (SNOMED, LOINC), not identifiers.
CODE_TAGS: Final = frozenset(
    {0x00080100, 0x00080102, 0x00080103, 0x00080105, 0x0008010F, 0x00080119, 0x00080120}
)
LONG_META_VRS: Final = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
ALLOWED_NAMES: Final = frozenset({"", "ANONYMIZED"})

_PSEUDONYM_ANY: Final = re.compile(r"[A-Z0-9][A-Z0-9-]{0,15}-[A-Z2-7]{12}")
_GENERATED_UID: Final = re.compile(r"2\.25\.(?:0|[1-9][0-9]{0,38})")
_DATE: Final = re.compile(r"(\d{8})(?:\d{0,6}(?:\.\d{1,6})?)?(?:[+-]\d{4})?")
_SPACES: Final = re.compile(r"\s+")
#: Needles shorter than this match whole words only, and never inside pixel data.
SHORT_NEEDLE: Final = 6
MIN_NEEDLE: Final = 4
EXCERPT_LIMIT: Final = 40
#: Binary values larger than this are left to the raw-bytes search.
TEXT_FROM_BINARY_LIMIT: Final = 1 << 20

_PRINTABLE: Final = bytes(range(0x20, 0x7F)) + b"\t\r\n" + bytes(range(0xA0, 0x100))

_MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)

#: Identifier-like patterns, each with what it is; run on text values only.
_STREET_SUFFIX = (
    r"street|st|road|rd|avenue|ave|lane|boulevard|blvd|drive|court|plaza|place|way|"
    r"terrace|square|highway|weg|strasse|straße|gasse|allee"
)
_ROMANCE_STREET = r"via|viale|rue|calle|avenida|rua|piazza|chemin|largo"
IDENTIFIER_PATTERNS: Final[tuple[tuple[str, re.Pattern[str]], ...]] = (
    (
        "e-mail address",
        re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ),
    ("US social security number", re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")),
    # Swedish personnummer (YYMMDD-NNNN, YYYYMMDD-NNNN).
    ("national identity number", re.compile(r"(?<![\d-])(?:\d{2})?\d{6}[-+]\d{4}(?![\d-])")),
    # French NIR, written with its usual spaces.
    (
        "national identity number",
        re.compile(r"(?<!\d)[12] \d{2} (?:0[1-9]|1[0-2]) \d{2} \d{3} \d{3}(?: \d{2})?(?!\d)"),
    ),
    # UK National Insurance number.
    (
        "national identity number",
        re.compile(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
    ),
    # Italian codice fiscale.
    ("national identity number", re.compile(r"\b[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z]\b")),
    # Canadian SIN (3-3-3 with one separator).
    ("national identity number", re.compile(r"(?<![\d-])\d{3}([ -])\d{3}\1\d{3}(?![\d-])")),
    # North American numbers and the UK NHS number share the 3-3-4 shape.
    ("phone or NHS number", re.compile(r"(?<![\d.-])\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?![\d.-])")),
    ("phone number", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}(?![\d])")),
    ("phone number", re.compile(r"(?<![\d.-])0\d{2,4}[ /-]\d{5,8}(?![\d.-])")),
    ("phone number", re.compile(r"(?<![\d.-])\d{3}-\d{4}(?![\d-])")),
    ("record or accession number", re.compile(r"\b[A-Za-z]{1,6}[-_#:]?\d{6,12}\b")),
    ("long digit run", re.compile(r"(?<![\d.,])\d{7,12}(?![\d.,])")),
    (
        "street address",
        re.compile(rf"(?i:\b\d{{1,5}}[a-z]?,?\s+(?:[a-zà-ÿ'.-]+\s+){{1,3}}(?:{_STREET_SUFFIX})\b)"),
    ),
    (
        "street address",
        re.compile(
            r"(?i:\b\d{1,5}[a-z]?\s+[a-zà-ÿ]+(?:weg|strasse|straße|gasse|allee)\b"
            r"|\b[a-zà-ÿ]+(?:weg|strasse|straße|gasse|allee|str\.)\s+\d{1,5}[a-z]?\b)"
        ),
    ),
    (
        "street address",
        re.compile(
            rf"(?i:\b\d{{1,5}}[a-z]?,?\s+(?:{_ROMANCE_STREET})\s+[a-zà-ÿ'-]+"
            rf"|\b(?:{_ROMANCE_STREET})\s+(?:[a-zà-ÿ'-]+\s+){{1,3}}\d{{1,5}}\b)"
        ),
    ),
)


@dataclass(frozen=True)
class Originals:
    """What the node knows about the originals (the coordinator passes None)."""

    values: frozenset[str]  # original identifying text values
    dates: frozenset[str]  # original dates YYYYMMDD
    uids: frozenset[str]  # original UIDs

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> Originals:
        """Collect the originals of the node's vault records (one per instance).

        A record holds ``patient_id``, ``patient_name``, ``accession_number``,
        ``study_date``, the ``[original, new]`` pairs of ``sop_instance_uid``,
        ``study_instance_uid``, ``series_instance_uid`` and ``uids``, and
        ``originals``: the text values the profile took out.
        """
        values: set[str] = set()
        dates: set[str] = set()
        uids: set[str] = set()
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(f'Argument "records": record {index} is not a mapping.')
            texts = [record.get(key) for key in ("patient_id", "patient_name", "accession_number")]
            found = record.get("originals") or []
            if not isinstance(found, list | tuple):
                raise ValueError(f'Argument "records": record {index} "originals" is not a list.')
            texts.extend(found)
            for text in texts:
                if isinstance(text, str) and text.strip(" \x00"):
                    value = text.strip(" \x00")
                    values.add(value)
                    date = _date_of(value)
                    if date is not None:
                        dates.add(date)
            study_date = _date_of(str(record.get("study_date") or ""))
            if study_date is not None:
                dates.add(study_date)
            pairs = [record.get(k) for k in _UID_KEYS]
            pairs.extend(record.get("uids") or [])
            for pair in pairs:
                if pair is None:
                    continue
                if not isinstance(pair, list | tuple) or len(pair) != 2:
                    raise ValueError(
                        f'Argument "records": record {index} has a UID entry that is not an '
                        "[original, new] pair."
                    )
                uid = str(pair[0]).strip(" \x00")
                if uid and uid not in STANDARD_UIDS:
                    uids.add(uid)
        return cls(values=frozenset(values), dates=frozenset(dates), uids=frozenset(uids))


_UID_KEYS: Final = ("sop_instance_uid", "study_instance_uid", "series_instance_uid")


def scan(
    source: bytes | str | Path,
    options: DeidOptions,
    *,
    site_prefix: str | None = None,
    originals: Originals | None = None,
    safe_private: frozenset[SafePrivateKey] = DEFAULT_SAFE_PRIVATE,
) -> list[PhiFinding]:
    """Findings for one de-identified instance, most severe first (empty when clean).

    Parameters
    ----------
    source
        The file's bytes, or its path.
    options
        The profile options the instance was de-identified with.
    site_prefix
        The site's pseudonym prefix, when known: Patient's Name and ID must be
        ``<site_prefix>-`` and twelve base32 characters.
    originals
        The node's originals for this instance or exam (``None`` on the coordinator).
    safe_private
        The safe-private allowlist in force (used with Retain Safe Private).
    """
    if not isinstance(options, DeidOptions):
        raise TypeError('Argument "options" must be a DeidOptions.')
    if originals is not None and not isinstance(originals, Originals):
        raise TypeError('Argument "originals" must be an Originals or None.')
    if site_prefix is not None and not re.fullmatch(r"[A-Z0-9][A-Z0-9-]{0,15}", site_prefix):
        raise ValueError(f'Argument "site_prefix" is not a site prefix: "{site_prefix}".')
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    elif isinstance(source, str | Path):
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            return [_unreadable("file", f"cannot read the file: {exc.strerror or exc}")]
    else:
        raise TypeError('Argument "source" must be bytes, str or Path.')
    scanner = _Scanner(_profile(options, safe_private), site_prefix, originals)
    return scanner.run(data)


def at_least(findings: Iterable[PhiFinding], threshold: Severity) -> list[PhiFinding]:
    """The findings at or above a severity, most severe first."""
    kept = [f for f in findings if f.severity >= threshold]
    return sorted(kept, key=lambda f: -f.severity)


# -- originals: needles and matching -----------------------------------------------------


def _date_of(text: str) -> str | None:
    """YYYYMMDD of a DA or DT value, None when it is not one."""
    match = _DATE.fullmatch(text.strip())
    if match is None:
        return None
    day = match.group(1)
    try:
        dt.date(int(day[:4]), int(day[4:6]), int(day[6:8]))
    except ValueError:
        return None
    return day


def _date_forms(day: str) -> set[str]:
    """The ways people write a YYYYMMDD date."""
    year, month, dom = day[:4], day[4:6], day[6:8]
    name = _MONTHS[int(month) - 1]
    return {
        day,
        f"{year}-{month}-{dom}",
        f"{year}/{month}/{dom}",
        f"{year}.{month}.{dom}",
        f"{dom}/{month}/{year}",
        f"{dom}.{month}.{year}",
        f"{dom}-{month}-{year}",
        f"{month}/{dom}/{year}",
        f"{int(dom)} {name[:3]} {year}",
        f"{int(dom)} {name} {year}",
        f"{name[:3]} {int(dom)}, {year}",
        f"{name} {int(dom)}, {year}",
    }


def _normalise(text: str) -> str:
    """Lower case, ``^`` as a space, whitespace collapsed."""
    return _SPACES.sub(" ", text.lower().replace("^", " ")).strip()


def _raw_form(text: str) -> str:
    """A value as the latin-1 text of its bytes, ASCII lower-cased (how raw bytes are searched)."""
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return raw.lower().decode("latin-1")


def _identifying(value: str) -> bool:
    """Shaped like an identifier rather than a word: a person name, a number, an address."""
    return any(c.isdigit() or c in "^@" for c in value)


def _carries_nothing(value: str) -> bool:
    """A dummy value: nothing to look for in it."""
    upper = value.strip().upper()
    return upper in ("ANONYMIZED", "ANONYMOUS", "ANON") or upper in DUMMY_TEXT.values()


class _Matcher:
    """Multi-pattern substring search: Aho-Corasick when available, ``str.find`` otherwise."""

    def __init__(self, needles: Mapping[str, str]) -> None:
        self.needles = dict(needles)
        self._automaton: Any = None
        if _AHOCORASICK is not None and self.needles:
            automaton = _AHOCORASICK.Automaton()
            for needle in self.needles:
                automaton.add_word(needle, needle)
            automaton.make_automaton()
            self._automaton = automaton

    def find(self, text: str) -> Iterator[tuple[int, str]]:
        """(start, needle) of every occurrence, bounded as :func:`_bounded` says."""
        if not self.needles or not text:
            return
        if self._automaton is not None:
            for end, needle in self._automaton.iter(text):
                start = end - len(needle) + 1
                if _bounded(text, start, start + len(needle), needle):
                    yield start, needle
            return
        for needle in self.needles:
            start = text.find(needle)
            while start != -1:
                if _bounded(text, start, start + len(needle), needle):
                    yield start, needle
                start = text.find(needle, start + 1)


def _bounded(text: str, start: int, end: int, needle: str) -> bool:
    """Whether a hit stands on its own: numbers are not part of longer numbers or of
    UIDs (an eight-digit date may go on into a time), short needles are whole words."""
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    if needle[0].isdigit() and (before.isdigit() or before == "."):
        return False
    if needle[-1].isdigit() and after.isdigit() and not (len(needle) == 8 and needle.isdigit()):
        return False
    if len(needle) < SHORT_NEEDLE:
        return not (_word(before) or _word(after))
    return True


def _word(char: str) -> bool:
    """Part of a word (``\\w``)."""
    return char.isalnum() or char == "_"


@dataclass(frozen=True)
class _OriginalsIndex:
    """Needles of one :class:`Originals`: normalised for values, byte forms for raw bytes."""

    values: _Matcher
    raw: _Matcher
    dates: frozenset[str]
    uids: frozenset[str]


def _wanted(value: str) -> bool:
    """Long enough to mean something, and not a dummy or a pseudonym."""
    if len(value) < MIN_NEEDLE or (value.isdigit() and len(value) < 6):
        return False
    return not (_carries_nothing(value) or _PSEUDONYM_ANY.fullmatch(value.strip()))


@lru_cache(maxsize=16)
def _index(originals: Originals, full_dates: bool) -> _OriginalsIndex:
    """The needles of the originals: exact, normalised and date forms (cached per Originals)."""
    value_needles: dict[str, str] = {}
    raw_needles: dict[str, str] = {}
    dates = set() if full_dates else set(originals.dates)
    sources: list[str] = [v.strip(" \x00") for v in originals.values]
    for value in sources:
        if not _wanted(value):
            continue
        forms = {value, value.replace("^", " "), value.replace("^", "")}
        try:
            decoded = value.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            decoded = value
        forms.add(decoded)
        day = _date_of(value) if len(value) == 8 else None
        if day is not None and not full_dates:
            dates.add(day)
        for form in forms:
            normal = _normalise(form).rstrip(" ")
            if _wanted(normal):
                value_needles.setdefault(normal, value)
            raw = _raw_form(form.strip())
            if _wanted(raw):
                raw_needles.setdefault(raw, value)
    for day in dates:
        for form in _date_forms(day):
            value_needles.setdefault(_normalise(form), day)
            raw_needles.setdefault(_raw_form(form), day)
    return _OriginalsIndex(
        values=_Matcher(value_needles),
        raw=_Matcher(raw_needles),
        dates=frozenset(dates),
        uids=originals.uids,
    )


@lru_cache(maxsize=32)
def _profile(options: DeidOptions, safe_private: frozenset[SafePrivateKey]) -> CompiledProfile:
    """The compiled profile, once per options and allowlist."""
    return compile_profile(options, safe_private)


# -- excerpts ------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """Control characters as dots."""
    return "".join(c if c.isprintable() else "." for c in text)


def _mask(text: str) -> str:
    """Enough of a value to find it, not enough to read it: ``CNR******^*****NT``."""
    text = _clean(text.strip())
    if len(text) > EXCERPT_LIMIT:
        text = text[:EXCERPT_LIMIT] + "…"
    if len(text) <= 4:
        return text[:1] + "*" * (len(text) - 1)
    head, middle, tail = text[:3], text[3:-2], text[-2:]
    return head + "".join("*" if c.isalnum() else c for c in middle) + tail


def _short(text: str) -> str:
    """A non-identifying value (a UID, a code), shortened."""
    text = _clean(text.strip())
    if len(text) <= EXCERPT_LIMIT:
        return text
    return text[:24] + "…" + text[-12:]


def _unreadable(location: str, message: str) -> PhiFinding:
    """The finding for what cannot be read: the scanner never calls it clean."""
    return PhiFinding(
        severity=Severity.CRITICAL,
        kind="unreadable",
        location=location,
        message=message + "; nothing in it can be vouched for",
    )


def _tag(tag: int) -> str:
    """``(gggg,eeee)``."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# -- values ----------------------------------------------------------------------------------


def _strings(value: Any) -> list[str]:
    """The string values of an element value (multi-values split)."""
    if value is None:
        return []
    if isinstance(value, list | tuple | MultiValue):
        out: list[str] = []
        for item in value:
            out.extend(_strings(item))
        return out
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [str(value)]


def _is_empty(elem: DataElement) -> bool:
    """No value, or only padding."""
    value = elem.value
    if elem.is_empty or value is None:
        return True
    if isinstance(value, Sequence):
        return len(value) == 0
    if isinstance(value, bytes):
        return not value.strip(b" \x00")
    if isinstance(value, int | float) and not isinstance(value, str):
        return False
    return all(not s.strip(" \x00") for s in _strings(value))


def _is_dummy(elem: DataElement, vr: str) -> bool:
    """Whether an element holds exactly the dummy value of its VR."""
    value = elem.value
    if vr == "UR":
        return _is_empty(elem)
    if vr in NUMBER_VRS:
        try:
            numbers = [float(s) for s in _strings(value)] if vr in ("DS", "IS") else None
        except ValueError:
            return False
        if numbers is not None:
            return bool(numbers) and all(n == 0 for n in numbers)
        items = list(value) if isinstance(value, list | tuple | MultiValue) else [value]
        return bool(items) and all(v == 0 for v in items)
    if vr in BINARY_VRS or isinstance(value, bytes):
        return isinstance(value, bytes) and bool(value) and not value.strip(b"\x00")
    expected = DUMMY_TEXT.get(vr, "ANONYMIZED")
    values = [s.strip(" \x00") for s in _strings(value)]
    return bool(values) and all(v == expected for v in values)


def _binary_text(raw: bytes) -> str | None:
    """The text of a binary (UN, OB) value when it is mostly printable text."""
    body = raw.strip(b" \x00")
    if not body or len(body) > TEXT_FROM_BINARY_LIMIT:
        return None
    unprintable = len(body.translate(None, _PRINTABLE))
    if unprintable > len(body) // 10:
        return None
    return body.decode("latin-1")


_PDF_STREAM: Final = re.compile(rb"stream\r?\n(.*?)\r?\nendstream", re.DOTALL)


def _document_text(raw: bytes) -> str:
    """An encapsulated document's bytes as text, compressed PDF streams inflated."""
    parts = [raw.decode("latin-1")]
    for match in _PDF_STREAM.finditer(raw):
        try:
            inflated = zlib.decompressobj().decompress(match.group(1), TEXT_FROM_BINARY_LIMIT)
        except zlib.error:
            continue
        parts.append(inflated.decode("latin-1"))
    return "\n".join(parts)


def _uid_ok(uid: str) -> bool:
    """A UID a de-identified instance may hold: generated (2.25) or registered."""
    return not uid or uid in STANDARD_UIDS or _GENERATED_UID.fullmatch(uid) is not None


def _meta_end(data: bytes) -> int | None:
    """Where the data set starts: after preamble, ``DICM`` and group 0002 (explicit VR LE)."""
    if data[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(data):
        if int.from_bytes(data[pos : pos + 2], "little") != 0x0002:
            return pos
        if data[pos + 4 : pos + 6] in LONG_META_VRS:
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    if pos > len(data):
        raise ValueError(f"file meta cut short ({pos - len(data)} bytes missing)")
    return pos


def _inflates_past(data: bytes, limit: int) -> bool:
    """Whether a deflated file's data set inflates to more than ``limit`` bytes (counted,
    not kept); False for any other transfer syntax."""
    end = _meta_end(data)
    if end is None or DEFLATED.encode("ascii") not in data[132:end]:
        return False
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending = data[end:]
    while pending:
        total += len(inflater.decompress(pending, 1 << 20))
        if total > limit:
            return True
        pending = inflater.unconsumed_tail
    return False


# -- the scan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pixels:
    """The top-level pixel data value: where it is and whether it is encapsulated."""

    start: int
    end: int
    encapsulated: bool


@dataclass
class _Text:
    """A text value to search for originals, and where it is."""

    location: str
    text: str
    #: Whether the profile keeps the element (keep-list, an option, the allowlist).
    kept: bool


@dataclass
class _Scanner:
    """State while one file is scanned."""

    profile: CompiledProfile
    site_prefix: str | None
    originals: Originals | None
    findings: list[PhiFinding] = field(default_factory=list)
    texts: list[_Text] = field(default_factory=list)
    iod: int = -1
    pseudonym: str | None = None
    found_values: set[str] = field(default_factory=set)
    index: _OriginalsIndex | None = None
    pseudonym_shape: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        options = self.profile.options
        if self.originals is not None:
            self.index = _index(self.originals, options.retain_longitudinal_full_dates)
        prefix = re.escape(self.site_prefix) if self.site_prefix else r"[A-Z0-9][A-Z0-9-]{0,15}"
        self.pseudonym_shape = re.compile(rf"{prefix}-[A-Z2-7]{{12}}")

    # -- reporting ----------------------------------------------------------------------------

    def add(
        self, severity: Severity, kind: str, location: str, message: str, excerpt: str = ""
    ) -> None:
        self.findings.append(
            PhiFinding(
                severity=severity, kind=kind, location=location, message=message, excerpt=excerpt
            )
        )

    def result(self) -> list[PhiFinding]:
        """The findings, each once, most severe first."""
        seen: set[tuple[str, str, str, str]] = set()
        unique = []
        for finding in self.findings:
            key = (finding.kind, finding.location, finding.message, finding.excerpt)
            if key not in seen:
                seen.add(key)
                unique.append(finding)
        return sorted(unique, key=lambda f: -f.severity)

    # -- the file -----------------------------------------------------------------------------

    def run(self, data: bytes) -> list[PhiFinding]:
        """Scan one file's bytes."""
        try:
            bomb = _inflates_past(data, MAX_INFLATED)
        except (ValueError, zlib.error) as exc:
            return self.unreadable_file(data, f"not a readable DICOM file: {exc}")
        if bomb:
            return self.unreadable_file(
                data, f"the deflated data set inflates to more than {MAX_INFLATED >> 20} MiB"
            )
        try:
            ds = pydicom.dcmread(BytesIO(data))
            meta_end = _meta_end(data)
            instance = str(ds.get("SOPInstanceUID", "")).strip()
        except Exception as exc:  # any parser failure: the file cannot be vouched for
            return self.unreadable_file(data, f"not a readable DICOM file: {exc}")
        if not instance:
            return self.unreadable_file(data, "not a DICOM instance (no SOP Instance UID)")
        body: bytes | None = None
        pixels: _Pixels | None = None
        deflated = False
        try:
            deflated = str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED
            if meta_end is not None:
                body = data[meta_end:]
                if deflated:
                    body = zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)
            pixels = self.pixel_span(ds)
            sop_class = ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")
            self.iod = iod_index(str(sop_class).strip())
            self.top_level(ds)
            self.walk(ds, "", nested=False)
            if body is not None:
                self.verify_structure(ds, body)
            self.file_meta(ds)
            self.method_attributes(ds)
        except Exception as exc:  # a parser error deep in the file: never "clean"
            self.findings.append(_unreadable("file", f"cannot read every element: {exc}"))
        self.search_texts()
        if deflated and body is not None and meta_end is not None:
            self.search_raw(data[:meta_end], "raw bytes", None)
            self.search_raw(body, "inflated data set", pixels)
        else:
            self.search_raw(data, "raw bytes", pixels if not deflated else None)
        return self.result()

    def unreadable_file(self, data: bytes, why: str) -> list[PhiFinding]:
        """A file that cannot be read: CRITICAL, and its bytes still searched."""
        self.findings.append(_unreadable("file", why))
        self.search_raw(data, "raw bytes", None)
        return self.result()

    @staticmethod
    def pixel_span(ds: Dataset) -> _Pixels | None:
        """Where the top-level pixel data value is, in the (inflated) stream pydicom read."""
        raw = ds.get_item(PIXEL_DATA)
        if not isinstance(raw, RawDataElement) or raw.value is None:
            return None
        end = raw.value_tell + len(raw.value)
        return _Pixels(raw.value_tell, end, raw.length == UNDEFINED_LENGTH)

    def verify_structure(self, ds: Dataset, body: bytes) -> None:
        """Read the top level again, element by element: pydicom keeps the last of two
        elements with one tag and stops quietly at a stray delimiter or a cut-short value."""
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            return
        stream = BytesIO(body)
        earlier: dict[int, DataElement | RawDataElement] = {}
        previous = -1
        # Large values are skipped, not read: their bytes are in the body if it is whole.
        for raw in data_element_generator(stream, implicit, little, defer_size=DEFER):
            tag = int(raw.tag)
            hidden = earlier.get(tag)
            if hidden is not None:
                self.add(
                    Severity.HIGH,
                    "malformed",
                    _tag(tag),
                    "the element occurs twice: readers differ on which copy counts",
                )
                self.check_hidden(ds, hidden, tag, body)
            earlier[tag] = raw
            if tag < previous:
                self.add(Severity.MEDIUM, "malformed", _tag(tag), "elements out of order")
            previous = max(previous, tag)
            if isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH:
                have = (
                    len(raw.value)
                    if raw.value is not None
                    else max(0, min(raw.length, len(body) - raw.value_tell))
                )
                if have != raw.length:
                    self.findings.append(
                        _unreadable(_tag(tag), f"value cut short ({have} of {raw.length} bytes)")
                    )
        at = stream.tell()
        if at < len(body) and body[at:].strip(b"\x00"):
            self.findings.append(
                _unreadable(
                    f"data set @{at}",
                    f"{len(body) - at} bytes after the point where the data set stops being "
                    "readable",
                )
            )

    def check_hidden(
        self, ds: Dataset, hidden: DataElement | RawDataElement, tag: int, body: bytes
    ) -> None:
        """Check a copy of a duplicated element that pydicom's data set does not show."""
        location = f"{_tag(tag)} (hidden copy)"
        try:
            if isinstance(hidden, DataElement):
                elem = hidden
            else:
                if hidden.value is None and hidden.length != UNDEFINED_LENGTH:
                    end = hidden.value_tell + hidden.length
                    hidden = hidden._replace(value=body[hidden.value_tell : end])
                elem = convert_raw_data_element(hidden, ds=ds)
        except Exception as exc:  # reported: the copy cannot be vouched for
            self.findings.append(_unreadable(location, f"cannot decode: {exc}"))
            return
        public = (tag >> 16) % 2 == 0
        kept = public and self.public(tag, elem, location, False) is Outcome.KEEP
        self.inspect(tag, elem, location, kept, None)

    # -- the data set ----------------------------------------------------------------------

    def is_pseudonym(self, value: str) -> bool:
        return self.pseudonym_shape.fullmatch(value) is not None

    def top_level(self, ds: Dataset) -> None:
        """Patient's Name and ID hold one pseudonym (with the site's prefix when known)."""
        found: dict[int, str] = {}
        shape = (
            f'"{self.site_prefix}-" and 12 base32 characters'
            if self.site_prefix
            else "a site prefix, a dash and 12 base32 characters"
        )
        for tag in (PATIENT_NAME, PATIENT_ID):
            elem = ds.get(tag)
            text = "\\".join(_strings(elem.value)).strip(" \x00") if elem is not None else ""
            if not text:
                self.add(
                    Severity.HIGH, "not_replaced", _tag(tag), "the patient's pseudonym is missing"
                )
            elif not self.is_pseudonym(text):
                self.add(
                    Severity.HIGH,
                    "not_replaced",
                    _tag(tag),
                    f"not the patient's pseudonym ({shape})",
                    _mask(text),
                )
            else:
                found[tag] = text
        if len(set(found.values())) > 1:
            self.add(
                Severity.HIGH,
                "not_replaced",
                _tag(PATIENT_ID),
                "Patient's Name and Patient ID hold different pseudonyms",
            )
        self.pseudonym = found.get(PATIENT_ID) or found.get(PATIENT_NAME)

    def walk(self, ds: Dataset, prefix: str, nested: bool) -> None:
        """Every element of one data set; sequences recurse."""
        tags = [int(t) for t in list(ds.keys())]
        creators: dict[tuple[int, int], tuple[str, str]] = {}
        used: set[tuple[int, int]] = set()
        for tag in tags:
            group, element = tag >> 16, tag & 0xFFFF
            if group & 1 and 0x10 <= element <= 0xFF:
                try:
                    name = "\\".join(_strings(ds[tag].value)).strip(" \x00")
                except Exception:  # noqa: S112 - reported as unreadable in the loop below
                    continue
                creators[(group, element)] = (name, f"{prefix}{_tag(tag)}")
        for tag in tags:
            location = f"{prefix}{_tag(tag)}"
            raw = ds.get_item(tag)
            raw_vr = raw.VR if isinstance(raw, RawDataElement) else None
            raw_bytes = raw.value if isinstance(raw, RawDataElement) else None
            if (
                isinstance(raw, RawDataElement)
                and isinstance(raw_bytes, bytes)
                and raw.length != UNDEFINED_LENGTH
                and len(raw_bytes) != raw.length
            ):
                self.findings.append(
                    _unreadable(
                        location, f"value cut short ({len(raw_bytes)} of {raw.length} bytes)"
                    )
                )
            try:
                elem = ds[tag]
            except Exception as exc:  # an element pydicom cannot decode
                self.findings.append(_unreadable(location, f"cannot decode: {exc}"))
                if isinstance(raw_bytes, bytes):
                    text = _binary_text(raw_bytes)
                    if text:
                        self.text_checks(text, location, False)
                continue
            if (tag >> 16) & 1:
                creator = self.private(tag, elem, raw_vr, raw_bytes, creators, used, location)
                self.inspect(tag, elem, location, creator is not None, creator, nested)
            else:
                outcome = self.public(tag, elem, location, nested)
                self.inspect(tag, elem, location, outcome is Outcome.KEEP, None, nested)
        for block, (name, location) in creators.items():
            if block not in used:
                self.add(
                    Severity.MEDIUM,
                    "private_not_allowed",
                    location,
                    "private creator with no private element (orphan)",
                    _short(name),
                )

    def public(self, tag: int, elem: DataElement, location: str, nested: bool) -> Outcome:
        """Check a public element against what the profile says should have happened."""
        vr = elem.VR
        if vr == "SQ":
            eff = "SQ"
        else:
            eff = dictionary_vr(tag) or vr
            if eff == "SQ":
                eff = vr  # encoded as a value, not as a sequence
        if not nested and (tag in GENERATED_TAGS or tag in (PATIENT_NAME, PATIENT_ID)):
            return Outcome.KEEP  # written by the de-identifier: checked on their own
        outcome = resolve(self.profile.code(tag), eff, required_type(tag, self.iod, nested))
        if outcome is Outcome.KEEP or outcome is Outcome.RECURSE or outcome is Outcome.SHIFT:
            return outcome  # dates are checked against the originals with every value
        empty = _is_empty(elem)
        excerpt = "" if empty else _value_excerpt(elem)
        if outcome is Outcome.REMOVE:
            self.add(
                Severity.LOW if empty else Severity.HIGH,
                "not_removed",
                location,
                "the profile removes this attribute",
                excerpt,
            )
        elif outcome is Outcome.EMPTY and not empty:
            self.add(
                Severity.HIGH,
                "not_emptied",
                location,
                "the profile empties this attribute",
                excerpt,
            )
        elif outcome is Outcome.DUMMY and not _is_dummy(elem, eff):
            self.add(
                Severity.LOW if empty else Severity.HIGH,
                "not_replaced",
                location,
                f"the profile replaces this attribute with the {eff} dummy value",
                excerpt,
            )
        elif outcome is Outcome.KEEP_CLASS_UID or (
            outcome is Outcome.MAP_UID and not self.profile.options.retain_uids
        ):
            bad = [u.strip(" \x00") for u in _strings(elem.value)]
            bad = [u for u in bad if not _uid_ok(u)]
            if bad:
                self.add(
                    Severity.HIGH,
                    "not_replaced",
                    location,
                    "a UID the profile replaces with a generated (2.25) UID",
                    _short(bad[0]),
                )
        elif outcome is Outcome.PSEUDONYM and not empty:
            values = [s.strip(" \x00") for s in _strings(elem.value)]
            if tag == PATIENT_NAME:
                self.add(
                    Severity.HIGH,
                    "not_emptied",
                    location,
                    "a nested Patient's Name must be empty",
                    excerpt,
                )
            elif not all(not v or self.is_pseudonym(v) for v in values):
                self.add(
                    Severity.HIGH,
                    "not_replaced",
                    location,
                    "a nested Patient ID must be a pseudonym",
                    excerpt,
                )
        return outcome

    def private(
        self,
        tag: int,
        elem: DataElement,
        raw_vr: str | None,
        raw_bytes: bytes | None,
        creators: Mapping[tuple[int, int], tuple[str, str]],
        used: set[tuple[int, int]],
        location: str,
    ) -> str | None:
        """Check a private element; its creator's name when it may stay, else None."""
        group, element = tag >> 16, tag & 0xFFFF
        if element < 0x10:
            self.add(
                Severity.LOW if element == 0 else Severity.HIGH,
                "private_not_allowed",
                location,
                "private group length or reserved private element",
            )
            return None
        if element <= 0xFF:
            return None  # a creator: judged once its block is known (orphans)
        block = (group, element >> 8)
        creator = creators.get(block)
        excerpt = _value_excerpt(elem)
        if creator is None:
            self.add(
                Severity.HIGH,
                "private_not_allowed",
                location,
                "private element without its private creator",
                excerpt,
            )
            return None
        used.add(block)
        name = creator[0]
        # Implicit VR: as for the engine, the allowlist must pin the VR down.
        vr = raw_vr or "UN"
        if self.private_allowed(name, group, element & 0xFF, vr, raw_bytes):
            return name
        if self.profile.options.retain_safe_private:
            why = f'private element of "{_short(name)}" not on the safe-private allowlist'
        else:
            why = "private element (Retain Safe Private is off: none may stay)"
        self.add(Severity.HIGH, "private_not_allowed", location, why, excerpt)
        return None

    def private_allowed(
        self, creator: str, group: int, low: int, vr: str, raw: bytes | None
    ) -> bool:
        """Whether the safe-private allowlist keeps a private element (the engine's rule)."""
        profile = self.profile
        if not profile.options.retain_safe_private or vr == "SQ":
            return False
        if profile.keeps_private((creator, group, low, vr)):
            return True
        if vr != "UN" or raw is None:
            return False
        vrs = [k[3] for k in profile.safe_private if k[:3] == (creator, group, low)]
        return len(vrs) == 1 and _plausible(raw, vrs[0])

    # -- values ------------------------------------------------------------------------------

    def inspect(
        self,
        tag: int,
        elem: DataElement,
        location: str,
        kept: bool,
        creator: str | None,
        nested: bool = False,
    ) -> None:
        """Value checks on any element (public, private, file meta): names, UIDs, dates, text."""
        vr = elem.VR
        value = elem.value
        if vr == "SQ":
            for index, item in enumerate(value or []):
                self.walk(item, f"{location}[{index}]/", nested=True)
            return
        if isinstance(value, bytes):
            self.binary_checks(tag, value, vr, location, kept, creator)
            return
        strings = [s.strip(" \x00") for s in _strings(value)]
        self.string_checks(tag, strings, vr, location, kept)

    def binary_checks(
        self,
        tag: int,
        value: bytes,
        vr: str,
        location: str,
        kept: bool,
        creator: str | None,
    ) -> None:
        """Binary values: encapsulated documents, and UN read as what it holds."""
        if tag == PIXEL_DATA:
            return
        if tag == ENCAPSULATED_DOCUMENT:
            self.text_checks(_document_text(value), location, kept)
            return
        if vr != "UN":
            return  # OB, OW...: left to the raw-bytes search
        # UN: read it as the VR the dictionaries give it, else as text when it is text.
        meant = dictionary_vr(tag) if not (tag >> 16) & 1 else ""
        if (tag >> 16) & 1 and creator:
            try:
                meant = str(private_dictionary_VR(tag, creator))
            except KeyError:
                meant = ""
        if meant in STRING_VRS or meant == "UI":
            strings = [s.strip(" \x00") for s in value.decode("latin-1").split("\\")]
            self.string_checks(tag, strings, meant, location, kept)
            return
        text = _binary_text(value)
        if text:
            self.text_checks(text, location, kept)

    def string_checks(
        self, tag: int, strings: list[str], vr: str, location: str, kept: bool
    ) -> None:
        """String values: names, UIDs, dates, identifier shapes, and text for the originals."""
        strings = [s for s in strings if s]
        if not strings:
            return
        if vr == "PN":
            for name in strings:
                bare = name.strip("^= ")
                if bare in ALLOWED_NAMES or self.is_pseudonym(bare):
                    continue
                self.add(Severity.CRITICAL, "person_name", location, "a person's name", _mask(name))
        if vr == "UI":
            self.uid_checks(strings, location, kept)
            return
        if vr in ("DA", "DT"):
            self.date_checks(strings, location, kept)
            return
        if vr in PATTERN_VRS and tag not in CODE_TAGS:
            for text in strings:
                self.pattern_checks(text, location, kept)
        if self.index is not None and vr in STRING_VRS:
            for text in strings:
                self.texts.append(_Text(location, _normalise(text), kept))

    def text_checks(self, text: str, location: str, kept: bool) -> None:
        """Free text found in a binary value: identifier patterns and originals."""
        self.pattern_checks(text, location, kept)
        if self.index is not None:
            self.texts.append(_Text(location, _normalise(text), kept))

    def uid_checks(self, uids: list[str], location: str, kept: bool) -> None:
        """UIDs: generated or registered, and none the vault maps."""
        if self.profile.options.retain_uids:
            return  # kept on purpose: nothing tells an original from a new one
        for uid in uids:
            if self.index is not None and uid in self.index.uids:
                self.add(
                    Severity.HIGH,
                    "original_uid",
                    location,
                    "an original UID (the vault maps it)",
                    _short(uid),
                )
            elif not _uid_ok(uid):
                # A UID an option keeps (Device UID under Retain Device Identity) is
                # original by design: reported, at low severity.
                self.add(
                    Severity.LOW if kept else Severity.HIGH,
                    "original_uid",
                    location,
                    "a UID neither generated (2.25) nor a registered standard UID"
                    + (" (the attribute is kept by an option)" if kept else ""),
                    _short(uid),
                )

    def date_checks(self, values: list[str], location: str, kept: bool) -> None:
        """Dates: none equal to an original date (node only)."""
        if self.index is None:
            return
        if kept and self.profile.options.retain_longitudinal_full_dates:
            # Dates kept on purpose: an equal date removed elsewhere is no leak.
            self.found_values.update(values)
            self.found_values.update(d for d in map(_date_of, values) if d is not None)
            return
        for value in values:
            day = _date_of(value)
            if day is not None and day in self.index.dates:
                self.found_values.update((day, value))
                self.add(
                    Severity.HIGH,
                    "date_not_shifted",
                    location,
                    "an original date, not shifted",
                    _mask(value),
                )

    def pattern_checks(self, text: str, location: str, kept: bool) -> None:
        """Identifier shapes in free text: record numbers, phones, e-mails, addresses, IDs."""
        # An identifier shape in a value the profile keeps (a device serial number kept
        # by Retain Device Identity) is the site's choice: reported, at low severity.
        severity = Severity.LOW if kept else Severity.MEDIUM
        if _carries_nothing(text):
            return
        text = self.pseudonym_shape.sub(" ", text)
        labels: set[str] = set()
        for label, pattern in IDENTIFIER_PATTERNS:
            if label in labels:
                continue
            for match in pattern.finditer(text):
                token = match.group(0)
                if label == "phone number" and token.startswith("+"):
                    digits = sum(c.isdigit() for c in token)
                    if not 7 <= digits <= 15:
                        continue
                labels.add(label)
                self.add(
                    severity, "identifier_pattern", location, f"looks like a {label}", _mask(token)
                )
                break

    # -- originals -----------------------------------------------------------------------------

    def search_texts(self) -> None:
        """One multi-pattern pass over every text value for the originals (normalised)."""
        if self.index is None or not self.texts:
            return
        starts: list[int] = []
        position = 0
        for text in self.texts:
            starts.append(position)
            position += len(text.text) + 1
        joined = "\x00".join(t.text for t in self.texts)
        reported: set[tuple[str, str]] = set()
        for start, needle in self.index.values.find(joined):
            text = self.texts[bisect_right(starts, start) - 1]
            original = self.index.values.needles[needle]
            if (text.location, original) in reported:
                continue
            reported.add((text.location, original))
            self.found_values.add(original)
            # The whole value, in the original's own form (not a date written otherwise).
            whole = text.text == needle == _normalise(original)
            if text.kept and "^" not in original and (whole or not _identifying(original)):
                # What the profile removed in one place and keeps in another (TOSHIBA in a
                # private tag and in Manufacturer, a station name kept by Retain Device
                # Identity): the keep-list's or the site's call, reported at low severity.
                severity = Severity.LOW
                why = "holds a value the profile took out elsewhere (this attribute is kept)"
            else:
                severity = Severity.CRITICAL
                why = "holds an original value the profile took out"
            self.add(severity, "original_value", text.location, why, _mask(needle))

    def search_raw(self, buf: bytes, label: str, pixels: _Pixels | None) -> None:
        """The originals in the bytes themselves: what no parser shows is found here.

        Native pixel data is skipped: its bytes are samples, and text in them is
        burned in (a job for OCR). Encapsulated pixel data is searched (JPEG comment
        segments carry text), for needles long enough not to match by chance.
        """
        if self.index is None:
            return
        if pixels is not None and not pixels.encapsulated:
            self.search_span(buf[: pixels.start], 0, label, None)
            self.search_span(buf[pixels.end :], pixels.end, label, None)
        else:
            self.search_span(buf, 0, label, pixels)

    def search_span(self, buf: bytes, base: int, label: str, pixels: _Pixels | None) -> None:
        """One multi-pattern pass over bytes (ASCII case folded) for the originals."""
        if self.index is None:
            return
        text = buf.lower().decode("latin-1")
        for start, needle in self.index.raw.find(text):
            original = self.index.raw.needles[needle]
            if original in self.found_values:
                continue
            at = base + start
            if (
                pixels is not None
                and pixels.start <= at < pixels.end
                and len(needle) < SHORT_NEEDLE
            ):
                continue  # a short word inside compressed pixels is chance, not a leak
            self.found_values.add(original)
            self.add(
                Severity.CRITICAL,
                "original_value",
                f"{label} @{at}",
                "an original value in the file's bytes",
                _mask(needle),
            )

    # -- file meta and method attributes ---------------------------------------------------

    def file_meta(self, ds: Dataset) -> None:
        """Group 0002 rebuilt: only the elements a writer adds, naming this instance."""
        meta = ds.file_meta
        for tag in [int(t) for t in list(meta.keys())]:
            location = f"file meta {_tag(tag)}"
            try:
                elem = meta[tag]
            except Exception as exc:  # a meta element pydicom cannot decode
                self.findings.append(_unreadable(location, f"cannot decode: {exc}"))
                continue
            if tag not in ALLOWED_META:
                self.add(
                    Severity.HIGH,
                    "file_meta",
                    location,
                    f"{elem.keyword or 'element'} came from the source: the file meta "
                    "was not rebuilt",
                    _value_excerpt(elem),
                )
            self.inspect(tag, elem, location, False, None)
        for meta_tag, tag, name, severity in (
            (0x00020003, SOP_INSTANCE_UID, "SOP Instance UID", Severity.HIGH),
            (0x00020002, SOP_CLASS_UID, "SOP Class UID", Severity.MEDIUM),
        ):
            in_meta = str(meta[meta_tag].value).strip(" \x00") if meta_tag in meta else ""
            in_data = str(ds[tag].value).strip(" \x00") if tag in ds else ""
            if in_meta != in_data:
                self.add(
                    severity,
                    "file_meta",
                    f"file meta {_tag(meta_tag)}",
                    f"Media Storage {name} differs from the data set's {name}",
                    _short(in_meta),
                )

    def method_attributes(self, ds: Dataset) -> None:
        """Patient Identity Removed, the CID 7050 codes and the temporal flag match the options."""
        options = self.profile.options
        removed = ds[PATIENT_IDENTITY_REMOVED].value if PATIENT_IDENTITY_REMOVED in ds else None
        if str(removed or "").strip().upper() != "YES":
            self.add(
                Severity.MEDIUM,
                "method_attributes",
                _tag(PATIENT_IDENTITY_REMOVED),
                "Patient Identity Removed is not YES",
                _short(str(removed or "")),
            )
        sequence = ds[METHOD_CODE_SEQUENCE].value if METHOD_CODE_SEQUENCE in ds else None
        if not sequence:
            self.add(
                Severity.MEDIUM,
                "method_attributes",
                _tag(METHOD_CODE_SEQUENCE),
                "De-identification Method Code Sequence is missing",
            )
        else:
            codes = {
                (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")))
                for item in sequence
            }
            expected = {(value, "DCM") for value, _ in options.method_codes()}
            missing = sorted(v for v, _ in expected - codes)
            extra = sorted(v for v, _ in codes - expected - {(CLEAN_PIXEL_DATA_CODE[0], "DCM")})
            if missing or extra:
                self.add(
                    Severity.MEDIUM,
                    "method_attributes",
                    _tag(METHOD_CODE_SEQUENCE),
                    "the CID 7050 codes do not match the options"
                    f" (missing: {', '.join(missing) or 'none'};"
                    f" unexpected: {', '.join(extra) or 'none'})",
                )
        if options.retain_longitudinal_full_dates:
            temporal = "UNMODIFIED"
        elif options.retain_longitudinal_modified_dates:
            temporal = "MODIFIED"
        else:
            temporal = "REMOVED"
        found = ds[TEMPORAL_MODIFIED].value if TEMPORAL_MODIFIED in ds else None
        if str(found or "").strip().upper() != temporal:
            self.add(
                Severity.LOW,
                "method_attributes",
                _tag(TEMPORAL_MODIFIED),
                f"Longitudinal Temporal Information Modified should be {temporal}",
                _short(str(found or "")),
            )


def _value_excerpt(elem: DataElement) -> str:
    """A masked excerpt of any element value."""
    value = elem.value
    if isinstance(value, Sequence):
        return f"{len(value)} item(s)"
    if isinstance(value, bytes):
        text = _binary_text(value)
        return _mask(text) if text else f"{len(value)} bytes"
    return _mask("\\".join(_strings(value)))


def _plausible(raw: bytes, vr: str) -> bool:
    """Whether implicit-VR private bytes can be the allowlisted VR."""
    sizes = {"FD": 8, "FL": 4, "US": 2, "SS": 2, "UL": 4, "SL": 4}
    if vr in sizes:
        return len(raw) % sizes[vr] == 0
    if vr in ("IS", "DS"):
        return all(c in b"0123456789+-.eE \\" for c in raw)
    if vr == "CS":
        return all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _\\" for c in raw)
    return False

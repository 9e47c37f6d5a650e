"""Malformed DICOM for the intake fuzz tests and the fuzz campaign (``bench/fuzz_dicom.py``).

Every input starts from a valid synthetic file (CT, CR, US, SR from
``radfed.synth.site``, explicit and implicit VR) and is broken at the byte or
element level by one mutation family — or several stacked. An input is named by
``(family, seed kind, number)`` and the same name always gives the same bytes,
so a failure found by a long campaign is a one-line regression test.

Families: ``truncate``, ``bad_vr``, ``huge_length``, ``deep_sequence``,
``charset``, ``transfer_syntax``, ``bad_fragments``, ``pixel_size``, ``no_preamble``,
``byte_flip``, ``garbage``, ``deflate_bomb`` and ``stacked``.
"""

from __future__ import annotations

import datetime as dt
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from io import BytesIO

import numpy as np
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from radfed.synth.site import (
    Uids,
    ct_series,
    make_patient,
    radiograph,
    text_report,
    ultrasound,
)

SEED_KINDS = ("ct", "ct_implicit", "cr", "us", "sr")
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"})
LONG_VRS |= {b"SV", b"UV"}
PIXEL_DATA = 0x7FE00010
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
#: What a deflate bomb inflates to (the node must not hold it all in memory).
BOMB_BYTES = 1536 << 20


# -- the valid seeds -------------------------------------------------------------------------


@cache
def seed_dataset(kind: str) -> Dataset:
    patient = make_patient(random.Random(7), 0)
    uids, rng = Uids(7), np.random.default_rng(7)
    study_uid = uids.new()
    when = dt.datetime(2021, 3, 4, 10, 30)
    if kind in ("ct", "ct_implicit"):
        syntax = ImplicitVRLittleEndian if kind == "ct_implicit" else None
        extra = {"syntax": syntax} if syntax else {}
        return ct_series(patient, uids, study_uid, when, "ACC9", 1, 16, rng, **extra)[0]
    if kind == "cr":
        return radiograph(patient, uids, study_uid, when, "ACC9", 16, rng)
    if kind == "us":
        return ultrasound(patient, uids, study_uid, when, "ACC9", rng)
    if kind == "sr":
        image = radiograph(patient, uids, study_uid, when, "ACC9", 16, rng)
        return text_report(patient, uids, study_uid, when, "ACC9", image)
    raise ValueError(f'Argument "kind" is not one of {", ".join(SEED_KINDS)}: "{kind}".')


def seed_bytes(kind: str, number: int) -> bytes:
    """A valid Part 10 file of ``kind``, its SOP Instance UID unique to ``number``."""
    ds = seed_dataset(kind)
    uid = f"1.2.826.0.1.3680043.10.1043.99.{SEED_KINDS.index(kind)}.{number}"
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


# -- locating elements (valid seeds only: little endian, defined lengths at the top) ----------


@dataclass(frozen=True)
class Span:
    """One top-level element of a file: where its header, length and value are."""

    tag: int
    start: int
    vr_at: int | None  # None: implicit VR
    length_at: int
    length_size: int
    vstart: int
    vend: int


def meta_end(data: bytes) -> int:
    pos = 132
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        if data[pos + 4 : pos + 6] in LONG_VRS:
            if pos + 12 > len(data):
                return len(data)
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return pos


def transfer_syntax(data: bytes) -> str:
    for span in spans(data, meta_only=True):
        if span.tag == 0x00020010:
            return data[span.vstart : span.vend].rstrip(b"\x00 ").decode("ascii", "replace")
    return ""


def spans(data: bytes, meta_only: bool = False) -> list[Span]:
    """Meta and top-level data set elements of a valid seed (stops at anything odd)."""
    out: list[Span] = []
    pos, end, implicit = 132, len(data), False
    body = meta_end(data)
    while pos + 8 <= end:
        if pos == body:
            if meta_only:
                break
            implicit = transfer_syntax_of(out, data) == IMPLICIT
        group, elem = struct.unpack_from("<HH", data, pos)
        tag = group << 16 | elem
        if implicit:
            length = struct.unpack_from("<L", data, pos + 4)[0]
            span = Span(tag, pos, None, pos + 4, 4, pos + 8, pos + 8 + length)
        elif data[pos + 4 : pos + 6] in LONG_VRS:
            length = struct.unpack_from("<L", data, pos + 8)[0]
            span = Span(tag, pos, pos + 4, pos + 8, 4, pos + 12, pos + 12 + length)
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            span = Span(tag, pos, pos + 4, pos + 6, 2, pos + 8, pos + 8 + length)
        if length == 0xFFFFFFFF or span.vend > end:
            break
        out.append(span)
        pos = span.vend
    return out


def transfer_syntax_of(found: list[Span], data: bytes) -> str:
    for span in found:
        if span.tag == 0x00020010:
            return data[span.vstart : span.vend].rstrip(b"\x00 ").decode("ascii", "replace")
    return ""


def _element(tag: int, vr: bytes, value: bytes, implicit: bool) -> bytes:
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<L", len(value)) + value
    if vr in LONG_VRS:
        return head + vr + b"\x00\x00" + struct.pack("<L", len(value)) + value
    return head + vr + struct.pack("<H", len(value) & 0xFFFF) + value


def _vr_of(tag: int) -> bytes:
    try:
        return dictionary_VR(tag).split(" or ")[0].encode("ascii")
    except KeyError:
        return b"UN"


def _implicit(data: bytes) -> bool:
    return transfer_syntax(data) == IMPLICIT


def replace_value(data: bytes, tag: int, value: bytes, vr: bytes | None = None) -> bytes:
    """``data`` with one top-level element's value replaced (added, in tag order, if absent)."""
    implicit = _implicit(data) and tag >> 16 != 0x0002
    found = spans(data)
    for span in found:
        if span.tag == tag:
            used = vr or (data[span.vr_at : span.vr_at + 2] if span.vr_at else _vr_of(tag))
            return data[: span.start] + _element(tag, used, value, implicit) + data[span.vend :]
    at = next((s.start for s in found if s.tag > tag and s.tag >> 16 != 0x0002), len(data))
    return data[:at] + _element(tag, vr or _vr_of(tag), value, implicit) + data[at:]


def with_meta(data: bytes, syntax: bytes) -> bytes:
    """``data`` with its file meta rebuilt around another Transfer Syntax UID."""
    meta = [s for s in spans(data, meta_only=True) if s.tag not in (0x00020000, 0x00020010)]
    parts = [data[s.start : s.vend] for s in meta if s.tag < 0x00020010]
    parts.append(_element(0x00020010, b"UI", syntax, False))
    parts.extend(data[s.start : s.vend] for s in meta if s.tag > 0x00020010)
    body = b"".join(parts)
    group = _element(0x00020000, b"UL", struct.pack("<L", len(body)), False)
    return data[:132] + group + body + data[meta_end(data) :]


# -- the mutation families --------------------------------------------------------------------


def truncate(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return data[: rng.randrange(len(data))]
    edge = rng.choice(spans(data)) if spans(data) else None
    at = (edge.start if edge else 0) + rng.randint(-2, 12)
    return data[: max(0, min(at, len(data) - 1))]


def bad_vr(data: bytes, rng: random.Random) -> bytes:
    explicit = [s for s in spans(data) if s.vr_at is not None]
    span = rng.choice(explicit)
    assert span.vr_at is not None
    vr = rng.choice(
        [
            *(b"ZZ", b"\x00\x00", b"\xff\xfe", b"un", b"OB", b"US", b"SQ", b"UN", b"UT"),
            *(b"AT", b"  ", bytes(rng.randrange(256) for _ in range(2))),
        ]
    )
    return data[: span.vr_at] + vr + data[span.vr_at + 2 :]


HUGE = (0xFFFFFFF0, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0x10000000)


def huge_length(data: bytes, rng: random.Random) -> bytes:
    found = spans(data)
    pixel = [s for s in found if s.tag == PIXEL_DATA]
    span = pixel[0] if pixel and rng.random() < 0.3 else rng.choice(found)
    actual = span.vend - span.vstart
    if span.length_size == 2:
        value = rng.choice([0xFFFF, 0xFFFE, actual + 1, actual + 2, max(0, actual - 1)])
        packed = struct.pack("<H", value & 0xFFFF)
    else:
        value = rng.choice([*HUGE, len(data), actual + 1, actual + 2, max(0, actual - 1)])
        packed = struct.pack("<L", value & 0xFFFFFFFF)
    return data[: span.length_at] + packed + data[span.length_at + span.length_size :]


def _nested(depth: int, implicit: bool, closed: int, defined: bool, vr: bytes) -> bytes:
    """A sequence nested ``depth`` deep; only the innermost ``closed`` levels are closed."""
    item_open = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    item_end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    inner = _element(0x00080100, b"SH", b"DEEP", implicit)
    if defined:
        for _ in range(depth):
            item = struct.pack("<HHL", 0xFFFE, 0xE000, len(inner)) + inner
            inner = _element(0x0040A730, b"SQ", item, implicit)
        return inner
    head = struct.pack("<HH", 0x0040, 0xA730)
    head += (b"" if implicit else vr + b"\x00\x00") + struct.pack("<L", 0xFFFFFFFF)
    opened = (head + item_open) * depth
    return opened + inner + (item_end + seq_end) * min(closed, depth)


def deep_sequence(data: bytes, rng: random.Random) -> bytes:
    depth = rng.choice([65, 100, 300, 1000, 5000, rng.randint(1, 2000)])
    closed = rng.choice([depth, depth, 0, rng.randint(0, depth)])
    defined = rng.random() < 0.2 and depth <= 300
    implicit = _implicit(data)
    vr = b"UN" if rng.random() < 0.2 else b"SQ"
    nest = _nested(depth, implicit, closed, defined, vr)
    found = spans(data)
    at = next((s.start for s in found if s.tag > 0x0040A730), len(data))
    return data[:at] + nest + data[at:]


CHARSETS = (
    b"ISO_IR 999",
    b"ISO 2022 IR 87\\ISO 2022 IR 999",
    b"\xff\xfe\x00",
    b"ISO_IR 192",
    b"GB18030",
    b"ISO_IR 13\\\\\\",
    b"",
    b"\\",
    b"ISO 2022 IR 6\\ISO 2022 IR 87",
)
BAD_TEXT = (
    b"\xff\xfe\xfd\xfc",
    b"\xc3\x28\xa0\xa1",
    b"\x1b$B\x30\x21",  # an escape into JIS X 0208, never ended
    b"\x1b(\x1b$",
    b"ROSSI\x00ANNA",
    b"\xed\xa0\x80\xed\xb0\x80",  # UTF-8 encoded surrogates
    b"\x80" * 63,
)
TEXT_TAGS = (0x00100010, 0x00081030, 0x00080080, 0x00100020, 0x00321060, 0x00080090)


def charset(data: bytes, rng: random.Random) -> bytes:
    out = data
    if rng.random() < 0.8:
        value = rng.choice(
            [*CHARSETS, bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))]
        )
        out = replace_value(out, 0x00080005, value, b"CS")
    for _ in range(rng.randint(1, 3)):
        tag = rng.choice(TEXT_TAGS)
        out = replace_value(out, tag, rng.choice(BAD_TEXT) + rng.choice([b"", b"^X"]))
    return out


SYNTAXES = (
    IMPLICIT.encode(),
    EXPLICIT.encode(),
    BIG_ENDIAN.encode(),
    DEFLATED.encode(),
    b"1.2.840.10008.1.2.4.50",
    b"1.2.840.10008.1.2.4.90",
    b"1.2.840.10008.1.2.5",
    b"1.2.3.4.5.6",
    b"",
    b"\xff\xfe\x00",
    b"1." * 40,
)


def transfer_syntax_mismatch(data: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        # The body deflated, the meta not saying so (or the other way about).
        body = meta_end(data)
        squeezed = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        deflated = squeezed.compress(data[body:]) + squeezed.flush()
        head = with_meta(data, rng.choice(SYNTAXES))
        return head[: meta_end(head)] + deflated
    current = transfer_syntax(data).encode()
    return with_meta(data, rng.choice([s for s in SYNTAXES if s != current]))


ENCAPSULATED = (b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.5")


def bad_fragments(data: bytes, rng: random.Random) -> bytes:
    """Encapsulated pixel data whose fragments are not what the syntax says (a JPEG
    that is not one), under an encapsulated transfer syntax."""
    pixels = [s for s in spans(data) if s.tag == PIXEL_DATA]
    if not pixels:
        return with_meta(data, rng.choice(ENCAPSULATED))
    span = pixels[0]
    item = struct.Struct("<HHL")
    fragment = rng.choice(
        [b"\xff\xd8\xff\xe0" + bytes(12), bytes(rng.randrange(256) for _ in range(64)), b""]
    )
    fragment += b"\x00" * (len(fragment) % 2)
    value = item.pack(0xFFFE, 0xE000, 0) + item.pack(0xFFFE, 0xE000, len(fragment)) + fragment
    value += item.pack(0xFFFE, 0xE0DD, 0) if rng.random() < 0.8 else b""
    head = struct.pack("<HH", 0x7FE0, 0x0010) + b"OB\x00\x00" + struct.pack("<L", 0xFFFFFFFF)
    if _implicit(data):
        head = struct.pack("<HHL", 0x7FE0, 0x0010, 0xFFFFFFFF)
        return data[: span.start] + head + value
    return with_meta(data[: span.start] + head + value, rng.choice(ENCAPSULATED))


def pixel_size(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        tag = rng.choice([0x00280010, 0x00280011])
        return replace_value(data, tag, struct.pack("<H", rng.choice([0, 1, 3, 4096, 65535])))
    if choice == 1:
        bits = rng.choice([0, 1, 7, 12, 32, 64, 65535])
        return replace_value(data, 0x00280100, struct.pack("<H", bits))
    if choice == 2:
        frames = rng.choice([b"999999999", b"-1", b"0", b"abc", b"2", b"1e9"])
        return replace_value(data, 0x00280008, frames, b"IS")
    pixels = [s for s in spans(data) if s.tag == PIXEL_DATA]
    if not pixels:
        return replace_value(data, 0x00280002, struct.pack("<H", 3))
    span = pixels[0]
    value = data[span.vstart : span.vend]
    if choice == 3:
        value = value[: rng.randrange(len(value))]
    else:
        value += bytes(rng.randrange(256) for _ in range(rng.choice([1, 2, 100, 4096])))
    return replace_value(data, PIXEL_DATA, value)


def no_preamble(data: bytes, rng: random.Random) -> bytes:
    return rng.choice(
        [
            data[128:],  # DICM and the meta, no preamble
            data[132:],  # the meta group alone
            data[meta_end(data) :],  # a bare data set
            b"\x00" * 128 + data[meta_end(data) :],  # a preamble, no DICM
            data[:128],
            data[:132],
            b"",
            b"\x00",
            b"DICM",
        ]
    )


def byte_flip(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 2, 4, 16, 64])):
        at = rng.randrange(len(out)) if rng.random() < 0.5 else rng.randrange(min(len(out), 1024))
        out[at] = rng.randrange(256) if rng.random() < 0.5 else out[at] ^ (1 << rng.randrange(8))
    if rng.random() < 0.2:
        at = rng.randrange(len(out))
        run = rng.randint(1, 64)
        out[at : at + run] = bytes([rng.choice([0x00, 0xFF])]) * len(out[at : at + run])
    return bytes(out)


def garbage(data: bytes, rng: random.Random) -> bytes:
    noise = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 7, 131, 132, 2048])))
    return rng.choice([noise, b"\x00" * 128 + b"DICM" + noise, data[:140] + noise])


def deflate_bomb(data: bytes, rng: random.Random) -> bytes:
    """A deflated data set that inflates to ``BOMB_BYTES`` (a valid start, then zeros or
    a repeated element)."""
    head = with_meta(data, DEFLATED.encode())
    start = meta_end(head)
    return head[:start] + _bomb(rng.random() < 0.5)


@cache
def _bomb(elements: bool) -> bytes:
    # A full flush resets the compressor: the same chunk then compresses to the same
    # bytes every time, so a stream of any size is one block repeated (no 1.5 GB pass).
    squeezed = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    unit = _element(0x00091010, b"LO", b"X" * 62, False) if elements else b""
    chunk = (unit * (1 << 14)) if elements else bytes(1 << 20)
    head = squeezed.compress(_element(0x00080005, b"CS", b"ISO_IR 100", False) + chunk)
    head += squeezed.flush(zlib.Z_FULL_FLUSH)
    block = squeezed.compress(chunk) + squeezed.flush(zlib.Z_FULL_FLUSH)
    return head + block * (BOMB_BYTES // len(chunk) - 1) + squeezed.flush()


FAMILIES: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": truncate,
    "bad_vr": bad_vr,
    "huge_length": huge_length,
    "deep_sequence": deep_sequence,
    "charset": charset,
    "transfer_syntax": transfer_syntax_mismatch,
    "bad_fragments": bad_fragments,
    "pixel_size": pixel_size,
    "no_preamble": no_preamble,
    "byte_flip": byte_flip,
    "garbage": garbage,
    "deflate_bomb": deflate_bomb,
}
STACKABLE = ("truncate", "bad_vr", "huge_length", "charset", "pixel_size", "byte_flip")


@dataclass(frozen=True)
class Malformed:
    """One generated input and the name that regenerates it."""

    family: str
    kind: str
    number: int
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.family}-{self.kind}-{self.number}"


def make(family: str, kind: str, number: int) -> Malformed:
    """The input named ``(family, kind, number)``: the same name, the same bytes."""
    return Malformed(
        family, kind, number, make_from(seed_bytes(kind, number), family, kind, number)
    )


def make_from(data: bytes, family: str, kind: str, number: int) -> bytes:
    """``data`` (a valid file) broken by ``family``, as the input of that name is."""
    rng = random.Random(f"{family}/{kind}/{number}")
    if family == "stacked":
        for name in rng.sample(STACKABLE, rng.randint(2, 3)):
            if len(data) > 140 and spans(data):
                data = FAMILIES[name](data, rng)
        return data
    if family == "valid":
        return data
    return FAMILIES[family](data, rng)


ALL_FAMILIES = (*FAMILIES, "stacked")


def malformed(
    families: tuple[str, ...] = ALL_FAMILIES, kinds: tuple[str, ...] = SEED_KINDS
) -> st.SearchStrategy[Malformed]:
    """A hypothesis strategy of malformed inputs."""
    return st.builds(
        make,
        st.sampled_from(families),
        st.sampled_from(kinds),
        st.integers(min_value=0, max_value=2**31),
    )

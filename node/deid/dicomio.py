"""Raw DICOM Part 10 structure: elements as byte spans, values never decoded.

The engine rewrites a file by copying the spans it keeps and writing new bytes
only where a value changes, so pixel data (native or encapsulated) leaves
byte-identical and a file costs little more than reading it. Values are read
only where the profile needs them (UIDs, dates, the patient's identifiers).

Every length is checked against the buffer: a truncated or inconsistent file
raises :class:`DicomFormatError` with a reason, never an IndexError.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final, NamedTuple

from protocols.deid.dictionary import KNOWN_VRS, dictionary_vr

ITEM: Final = 0xFFFEE000
ITEM_DELIMITER: Final = 0xFFFEE00D
SEQUENCE_DELIMITER: Final = 0xFFFEE0DD
UNDEFINED: Final = 0xFFFFFFFF
PIXEL_DATA: Final = 0x7FE00010
MAX_DEPTH: Final = 64
#: More elements than this in one data set is junk, not DICOM (the largest real headers
#: hold tens of thousands): refuse it rather than walk gigabytes of it.
MAX_ELEMENTS: Final = 1_000_000
#: Trailing zero padding is accepted when it is no longer than this.
MAX_PADDING: Final = 1 << 20
#: A deflated data set may inflate to this much and no more: a few kilobytes of
#: deflate can claim gigabytes (a "deflate bomb"), and the whole data set is held in
#: memory. Deflate is used for structured reports and small images in practice.
MAX_INFLATED: Final = 256 << 20
INFLATE_CHUNK: Final = 16 << 20

LONG_VRS: Final = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UR", "UT", "UN", "SV", "UV"}
)

IMPLICIT_VR_LE: Final = "1.2.840.10008.1.2"
EXPLICIT_VR_LE: Final = "1.2.840.10008.1.2.1"
DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE: Final = "1.2.840.10008.1.2.2"


class DicomFormatError(Exception):
    """The bytes are not a DICOM file we can rewrite safely.

    ``code`` is one of ``not_dicom``, ``truncated``, ``malformed``, ``too_large``
    (a deflated data set inflating past :data:`MAX_INFLATED`), ``pixel_data_size``
    (native pixel data of another size than its image pixel attributes describe) and
    ``bad_charset`` (a Specific Character Set that is not a code string).
    """

    def __init__(self, code: str, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: Byte offset where the structure stopped making sense, when known.
        self.position = position


class Encoding(NamedTuple):
    implicit: bool
    little: bool


IMPLICIT_LE_ENC: Final = Encoding(True, True)
EXPLICIT_LE_ENC: Final = Encoding(False, True)
EXPLICIT_BE_ENC: Final = Encoding(False, False)


class Element(NamedTuple):
    """One data element located in a buffer.

    ``vr`` is the VR as encoded (explicit) or from the dictionary (implicit; ``UN``
    when unknown). ``vend`` ends the value; ``end`` ends the element, delimiter
    included. ``items`` holds the parsed items of an undefined-length sequence.
    """

    tag: int
    vr: str
    start: int
    vstart: int
    vend: int
    end: int
    undefined: bool
    items: list[Item] | None


class Item(NamedTuple):
    start: int
    vstart: int
    vend: int
    end: int
    undefined: bool
    elements: list[Element] | None


@dataclass(frozen=True)
class Packing:
    """Struct layouts for one byte order."""

    tag: struct.Struct
    u16: struct.Struct
    u32: struct.Struct
    short_header: struct.Struct
    long_header: struct.Struct
    implicit_header: struct.Struct


def _packing(prefix: str) -> Packing:
    return Packing(
        tag=struct.Struct(prefix + "HH"),
        u16=struct.Struct(prefix + "H"),
        u32=struct.Struct(prefix + "L"),
        short_header=struct.Struct(prefix + "HH2sH"),
        long_header=struct.Struct(prefix + "HH2s2xL"),
        implicit_header=struct.Struct(prefix + "HHL"),
    )


LE: Final = _packing("<")
BE: Final = _packing(">")


def packing(enc: Encoding) -> Packing:
    return LE if enc.little else BE


def read_dataset(
    buf: bytes | memoryview,
    pos: int,
    end: int,
    enc: Encoding,
    depth: int = 0,
    in_item: bool = False,
) -> tuple[list[Element], int]:
    """Elements from ``pos`` up to ``end`` (or an item delimiter when ``in_item``)."""
    if depth > MAX_DEPTH:
        raise DicomFormatError("malformed", f"sequences nested deeper than {MAX_DEPTH} levels")
    p = packing(enc)
    unpack_tag = p.tag.unpack_from
    unpack_u16 = p.u16.unpack_from
    unpack_u32 = p.u32.unpack_from
    implicit = enc.implicit
    elements: list[Element] = []
    append = elements.append
    while pos < end:
        if pos + 8 > end:
            if not in_item and depth == 0 and _zeros(buf, pos, end):
                return elements, end  # zero padding after the last element
            raise DicomFormatError("truncated", f"element header cut short at byte {pos}", pos)
        group, elem = unpack_tag(buf, pos)
        tag = group << 16 | elem
        if tag == 0 and not in_item and depth == 0 and _zeros(buf, pos, end):
            return elements, end  # zero padding after the last element
        if len(elements) >= MAX_ELEMENTS:
            raise DicomFormatError("malformed", f"more than {MAX_ELEMENTS} elements", pos)
        if group == 0xFFFE:
            if tag == ITEM_DELIMITER and in_item:
                return elements, pos + 8
            if tag == SEQUENCE_DELIMITER and depth == 0 and not in_item:
                # A stray delimiter some writers leave at the end of the data set.
                pos += 8
                continue
            raise DicomFormatError("malformed", f"unexpected item tag {tag:08X} at byte {pos}")
        if implicit:
            length = unpack_u32(buf, pos + 4)[0]
            vstart = pos + 8
            vr = dictionary_vr(tag) or "UN"
        else:
            try:
                vr = bytes(buf[pos + 4 : pos + 6]).decode("ascii")
            except UnicodeDecodeError:
                vr = ""
            if vr not in KNOWN_VRS:
                raise DicomFormatError(
                    "malformed", f"invalid VR {bytes(buf[pos + 4 : pos + 6])!r} at byte {pos}", pos
                )
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise DicomFormatError("truncated", f"element header cut short at byte {pos}")
                length = unpack_u32(buf, pos + 8)[0]
                vstart = pos + 12
            else:
                length = unpack_u16(buf, pos + 6)[0]
                vstart = pos + 8
        if length == UNDEFINED:
            if tag == PIXEL_DATA or (vr in ("OB", "OW") and not implicit):
                vend, after = _skip_fragments(buf, vstart, end, enc)
                append(Element(tag, vr, pos, vstart, vend, after, True, None))
            else:
                # SQ, or UN holding a sequence (always implicit VR little endian inside).
                inner = IMPLICIT_LE_ENC if vr == "UN" else enc
                items, vend, after = read_items(buf, vstart, None, end, inner, depth + 1)
                append(
                    Element(tag, "SQ" if implicit else vr, pos, vstart, vend, after, True, items)
                )
            pos = after
            continue
        vend = vstart + length
        if vend > end:
            raise DicomFormatError(
                "truncated",
                f"element ({group:04X},{elem:04X}) declares {length} bytes, {end - vstart} remain",
            )
        append(Element(tag, vr, pos, vstart, vend, vend, False, None))
        pos = vend
    if in_item:
        raise DicomFormatError("truncated", "item without its delimiter")
    return elements, pos


def _zeros(buf: bytes | memoryview, pos: int, end: int) -> bool:
    """Whether ``buf[pos:end]`` is (short) zero padding."""
    return end - pos <= MAX_PADDING and bytes(buf[pos:end]).count(0) == end - pos


def read_items(
    buf: bytes | memoryview,
    pos: int,
    stop: int | None,
    limit: int,
    enc: Encoding,
    depth: int,
) -> tuple[list[Item], int, int]:
    """Items of a sequence value. ``stop`` is the value end, None for undefined length.

    Returns the items, the end of the value (start of the delimiter, if any) and
    the position after the element.
    """
    if depth > MAX_DEPTH:
        raise DicomFormatError("malformed", f"sequences nested deeper than {MAX_DEPTH} levels")
    p = packing(enc)
    items: list[Item] = []
    end = limit if stop is None else stop
    while True:
        if stop is not None and pos == stop:
            return items, pos, pos
        if pos + 8 > end:
            raise DicomFormatError("truncated", "sequence cut short")
        group, elem = p.tag.unpack_from(buf, pos)
        tag = group << 16 | elem
        length = p.u32.unpack_from(buf, pos + 4)[0]
        if tag == SEQUENCE_DELIMITER:
            if stop is not None:
                raise DicomFormatError(
                    "malformed", "sequence delimiter in a defined-length sequence"
                )
            return items, pos, pos + 8
        if tag != ITEM:
            raise DicomFormatError("malformed", f"expected an item, found tag {tag:08X}")
        vstart = pos + 8
        if length == UNDEFINED:
            elements, after = read_dataset(buf, vstart, end, enc, depth + 1, in_item=True)
            items.append(Item(pos, vstart, after - 8, after, True, elements))
            pos = after
        else:
            vend = vstart + length
            if vend > end:
                raise DicomFormatError("truncated", "item longer than its sequence")
            items.append(Item(pos, vstart, vend, vend, False, None))
            pos = vend


def _skip_fragments(buf: bytes | memoryview, pos: int, end: int, enc: Encoding) -> tuple[int, int]:
    """Walk encapsulated pixel data fragments; returns (delimiter start, after)."""
    p = packing(enc)
    while pos + 8 <= end:
        group, elem = p.tag.unpack_from(buf, pos)
        tag = group << 16 | elem
        length = p.u32.unpack_from(buf, pos + 4)[0]
        if tag == SEQUENCE_DELIMITER:
            return pos, pos + 8
        if tag != ITEM or length == UNDEFINED:
            raise DicomFormatError("malformed", f"bad pixel data fragment at byte {pos}")
        pos += 8 + length
        if pos > end:
            raise DicomFormatError("truncated", "pixel data fragment cut short")
    raise DicomFormatError("truncated", "encapsulated pixel data without its delimiter")


def items_of(buf: bytes | memoryview, el: Element, enc: Encoding, depth: int) -> list[Item]:
    """The items of a sequence element, parsing a defined-length value on demand."""
    if el.items is not None:
        return el.items
    items, _, _ = read_items(buf, el.vstart, el.vend, el.vend, enc, depth)
    return items


def item_elements(buf: bytes | memoryview, item: Item, enc: Encoding, depth: int) -> list[Element]:
    if item.elements is not None:
        return item.elements
    elements, _ = read_dataset(buf, item.vstart, item.vend, enc, depth)
    return elements


@dataclass
class Part10:
    """A file split into its meta information and its data set.

    ``dataset`` is the file's own buffer with the data set from ``start`` on, so
    element positions are file offsets — except for a deflated file, whose
    inflated data set is a new buffer (``deflated`` is then true).
    """

    meta: dict[int, bytes]
    transfer_syntax: str
    enc: Encoding
    deflated: bool
    dataset: bytes | memoryview
    start: int


def split_part10(buf: bytes | memoryview) -> Part10:
    """Find the meta group and the data set, whatever the file's preamble."""
    size = len(buf)
    if size >= 132 and bytes(buf[128:132]) == b"DICM":
        pos = 132
    elif size >= 8 and bytes(buf[0:2]) == b"\x02\x00" and bytes(buf[4:6]).isalpha():
        pos = 0  # meta group without a preamble
    else:
        return _without_meta(buf, 0)
    meta: dict[int, bytes] = {}
    while pos + 8 <= size:
        group, elem = LE.tag.unpack_from(buf, pos)
        if group != 0x0002:
            break
        vr = bytes(buf[pos + 4 : pos + 6]).decode("ascii", "replace")
        if vr in LONG_VRS:
            if pos + 12 > size:
                raise DicomFormatError("truncated", "file meta information cut short")
            length = LE.u32.unpack_from(buf, pos + 8)[0]
            vstart = pos + 12
        elif vr in KNOWN_VRS:
            length = LE.u16.unpack_from(buf, pos + 6)[0]
            vstart = pos + 8
        else:
            raise DicomFormatError("malformed", f"invalid VR in file meta at byte {pos}")
        if length == UNDEFINED or vstart + length > size:
            raise DicomFormatError("truncated", "file meta information cut short")
        meta[group << 16 | elem] = bytes(buf[vstart : vstart + length])
        pos = vstart + length
    raw_ts = meta.get(0x00020010)
    if raw_ts is None:
        guessed = _without_meta(buf, pos)
        guessed.meta = meta
        return guessed
    ts = raw_ts.rstrip(b"\x00 ").decode("ascii", "replace")
    if ts == IMPLICIT_VR_LE:
        enc = IMPLICIT_LE_ENC
    elif ts == EXPLICIT_VR_BE:
        enc = EXPLICIT_BE_ENC
    else:
        enc = EXPLICIT_LE_ENC  # explicit LE and every encapsulated syntax
    if pos >= size:
        raise DicomFormatError("truncated", "file ends after its meta information")
    if ts == DEFLATED_LE:
        inflated = inflate(buf[pos:], MAX_INFLATED)
        if not inflated:
            raise DicomFormatError("truncated", "deflated data set is empty")
        return Part10(meta, ts, enc, True, inflated, 0)
    return Part10(meta, ts, enc, False, buf, pos)


def inflate(data: bytes | memoryview, limit: int) -> memoryview:
    """Inflate a raw deflate stream, refusing it once it grows past ``limit`` bytes.

    Inflated a chunk at a time into one growing buffer, so a bomb costs ``limit``
    bytes of memory at most, not what it claims.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    # Chunks joined once at the end: a growing buffer can need a second copy of itself
    # each time it is moved, which a bomb would make cost several times the limit.
    chunks: list[bytes] = []
    total = 0
    pending: bytes | memoryview = data
    try:
        while pending:
            chunk = inflater.decompress(pending, INFLATE_CHUNK)
            total += len(chunk)
            if total > limit:
                raise DicomFormatError(
                    "too_large", f"deflated data set inflates to more than {limit >> 20} MiB"
                )
            chunks.append(chunk)
            pending = inflater.unconsumed_tail
        tail = inflater.flush()
        total += len(tail)
        chunks.append(tail)
    except zlib.error as exc:
        raise DicomFormatError("malformed", f"deflated data set does not inflate: {exc}") from exc
    if not inflater.eof:
        raise DicomFormatError("truncated", "deflated data set cut short")
    if total > limit:
        raise DicomFormatError(
            "too_large", f"deflated data set inflates to more than {limit >> 20} MiB"
        )
    return memoryview(b"".join(chunks))


def _without_meta(buf: bytes | memoryview, pos: int) -> Part10:
    """A bare data set (no preamble, no meta), as older PACS export: guess the encoding."""
    if len(buf) - pos < 8:
        raise DicomFormatError("not_dicom", "file too short to be DICOM")
    groups = (0x0008, 0x0010, 0x0018, 0x0020, 0x0028)
    vr = bytes(buf[pos + 4 : pos + 6])
    explicit = vr.isalpha() and vr.isupper() and vr.decode("ascii") in KNOWN_VRS
    if BE.tag.unpack_from(buf, pos)[0] in groups and explicit:
        return Part10({}, EXPLICIT_VR_BE, EXPLICIT_BE_ENC, False, buf, pos)
    if LE.tag.unpack_from(buf, pos)[0] not in groups:
        raise DicomFormatError("not_dicom", "no DICM prefix and no recognisable data set")
    ts = EXPLICIT_VR_LE if explicit else IMPLICIT_VR_LE
    enc = EXPLICIT_LE_ENC if explicit else IMPLICIT_LE_ENC
    return Part10({}, ts, enc, False, buf, pos)

"""The de-identification engine: one DICOM file in, one de-identified file out.

It applies the compiled profile (``protocols.deid.profile``) to every element
at every depth, deny by default, and rebuilds the file meta. Pixel data is
copied byte for byte. The engine only writes the re-identification record; it
never reads the vault, so nothing it outputs can come from it.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

from node.deid import dicomio as io
from node.deid.dicomio import DicomFormatError, Element, Encoding
from node.deid.pixelcheck import check_pixels
from node.deid.values import (
    Keyed,
    ReplacementError,
    dummy,
    is_standard_uid,
    is_uid,
    pad,
    shift_dates,
    split_values,
)
from protocols.deid.dictionary import dictionary_vr
from protocols.deid.options import DeidOptions
from protocols.deid.profile import (
    PATIENT_ID,
    PATIENT_NAME,
    CompiledProfile,
    Outcome,
    iod_index,
    required_type,
    resolve,
)
from protocols.version import DEID_PROFILE_VERSION, SOFTWARE_VERSION

#: Implementation Class UID of RadFed (2.25 form of a fixed UUID) and its version name.
IMPLEMENTATION_CLASS_UID: Final = b"2.25.166020553740462862658226424106263858957"
IMPLEMENTATION_VERSION_NAME: Final = ("RADFED_" + SOFTWARE_VERSION).encode("ascii")[:16]

#: VRs whose removed or replaced values the vault keeps for the PHI scanner.
REMEMBERED_VRS: Final = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "DA", "DT"})
MAX_ORIGINALS: Final = 256

SOP_CLASS_UID: Final = 0x00080016
SOP_INSTANCE_UID: Final = 0x00080018
STUDY_INSTANCE_UID: Final = 0x0020000D
SERIES_INSTANCE_UID: Final = 0x0020000E
MODALITY: Final = 0x00080060
IMAGE_TYPE: Final = 0x00080008
BURNED_IN_ANNOTATION: Final = 0x00280301
RECOGNIZABLE_FEATURES: Final = 0x00280302
PATIENT_BIRTH_DATE: Final = 0x00100030
ACCESSION_NUMBER: Final = 0x00080050
STUDY_DATE: Final = 0x00080020
SPECIFIC_CHARACTER_SET: Final = 0x00080005
#: What a Specific Character Set value (CS, a defined term per component) may hold.
_CHARSET_BYTES: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _-\\")

_READ_AT_TOP: Final = frozenset(
    {
        SOP_CLASS_UID,
        SOP_INSTANCE_UID,
        STUDY_INSTANCE_UID,
        SERIES_INSTANCE_UID,
        MODALITY,
        IMAGE_TYPE,
        BURNED_IN_ANNOTATION,
        RECOGNIZABLE_FEATURES,
        PATIENT_ID,
        PATIENT_NAME,
        PATIENT_BIRTH_DATE,
        ACCESSION_NUMBER,
        STUDY_DATE,
    }
)

SECONDARY_CAPTURE_PREFIX: Final = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_DOCUMENT_PREFIX: Final = "1.2.840.10008.5.1.4.1.1.104."
ULTRASOUND_CLASSES: Final = frozenset(
    {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1", "1.2.840.10008.5.1.4.1.1.6.2"}
)


class DeidError(Exception):
    """A readable file that could not be de-identified; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


#: A piece of output: new bytes, or (offset, length) of bytes copied from the input file.
Piece = bytes | tuple[int, int]


@dataclass
class DeidResult:
    """One de-identified instance, ready to be written.

    ``pieces`` are new bytes or spans of the input (``source``) copied unchanged —
    so a writer can have the kernel copy pixel data from file to file.
    """

    pieces: list[Piece]
    source: bytes | memoryview
    relpath: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    pseudonym: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    risk: list[str]
    notes: list[str]
    record: dict[str, Any]
    #: De-identified values the index records (modality, body part, shifted date, ...).
    attributes: dict[str, str | int | float | None] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p[1] for p in self.pieces)

    @property
    def chunks(self) -> list[bytes | memoryview]:
        """The output as buffers (spans as views of the input, nothing copied)."""
        view = self.source if isinstance(self.source, memoryview) else memoryview(self.source)
        return [p if isinstance(p, bytes) else view[p[0] : p[0] + p[1]] for p in self.pieces]


@dataclass
class _Context:
    """State while one file is rewritten."""

    buf: bytes | memoryview
    iod: int
    pseudonym: bytes
    shift: int
    uids: dict[bytes, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    overlays_kept: bool = False
    #: Text the profile took out (names, IDs, dates, addresses...): the node's PHI
    #: scanner looks for these in the output. Kept in the vault only.
    originals: dict[str, None] = field(default_factory=dict)
    #: Original top-level values the output changed, by tag: the reviewer's header diff.
    header: dict[str, str] = field(default_factory=dict)

    def remember(self, raw: bytes | memoryview, tag: int | None = None) -> None:
        data = bytes(raw)
        if tag is not None and len(self.header) < MAX_ORIGINALS:
            self.header[f"{tag:08X}"] = data.strip(b" \x00").decode("latin-1")[:256]
        if len(self.originals) >= MAX_ORIGINALS:
            return
        for value in data.split(b"\\"):
            text = value.strip(b" \x00").decode("latin-1")
            if 3 <= len(text) <= 256:
                self.originals[text] = None


def _header(tag: int, vr: str, length: int, enc: Encoding) -> bytes:
    p = io.packing(enc)
    if enc.implicit:
        return p.implicit_header.pack(tag >> 16, tag & 0xFFFF, length)
    if vr in io.LONG_VRS:
        return p.long_header.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)
    if length > 0xFFFF:
        raise DeidError("value_too_long", f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long")
    return p.short_header.pack(tag >> 16, tag & 0xFFFF, vr.encode("ascii"), length)


def _element(tag: int, vr: str, value: bytes, enc: Encoding) -> bytes:
    value = pad(value, vr)
    return _header(tag, vr, len(value), enc) + value


class Deidentifier:
    """Rewrites files with one compiled profile and one site's keys. Not thread-safe."""

    def __init__(self, profile: CompiledProfile, keyed: Keyed) -> None:
        self.profile = profile
        self.options: DeidOptions = profile.options
        self.keyed = keyed
        self._outcomes: dict[tuple[int, bool], dict[tuple[int, str], Outcome]] = {}
        self._method = self._method_values()

    # -- decisions -----------------------------------------------------------------

    def _outcome(self, tag: int, vr: str, iod: int, nested: bool) -> Outcome:
        table = self._outcomes.get((iod, nested))
        if table is None:
            table = self._outcomes[(iod, nested)] = {}
        key = (tag, vr)
        found = table.get(key)
        if found is None:
            code = self.profile.code(tag)
            found = resolve(code, vr, required_type(tag, iod, nested))
            table[key] = found
        return found

    # -- values ---------------------------------------------------------------------

    def _map_uids(self, ctx: _Context, raw: bytes, keep_standard: bool) -> bytes:
        out = []
        for value in split_values(raw):
            if not value or (keep_standard and is_standard_uid(value)):
                out.append(value)
                continue
            mapped = self.keyed.uid(value)
            ctx.uids[value] = mapped
            out.append(mapped)
        return pad(b"\\".join(out), "UI")

    # -- rewriting ------------------------------------------------------------------

    def _dataset(
        self,
        ctx: _Context,
        elements: list[Element],
        enc: Encoding,
        depth: int,
    ) -> list[tuple[int, int, int, bytes | None]]:
        """Rewrite one data set; entries are (tag, start, end, new bytes or None for a span)."""
        buf = ctx.buf
        nested = depth > 0
        iod = ctx.iod
        out: list[tuple[int, int, int, bytes | None]] = []
        append = out.append
        creators: dict[tuple[int, int], tuple[str, Element]] = {}
        used_creators: set[tuple[int, int]] = set()
        outcome_for = self._outcome
        for el in elements:
            tag = el.tag
            group = tag >> 16
            if group & 1:
                self._private(ctx, el, creators, used_creators, out)
                continue
            if tag == SPECIFIC_CHARACTER_SET:
                _check_charset(buf[el.vstart : el.vend])
            vr = el.vr
            if vr == "SQ":
                eff = "SQ"
            else:
                eff = dictionary_vr(tag) or vr
                if eff == "SQ" and vr != "UN":
                    eff = vr  # encoded as a value, not a sequence: treat it as encoded
            outcome = outcome_for(tag, eff, iod, nested)
            if el.undefined and eff != "SQ" and tag != io.PIXEL_DATA:
                # Undefined length holds items; only pixel data may keep them unwalked.
                ctx.notes.append(f"({group:04X},{tag & 0xFFFF:04X}) had undefined length: removed")
                continue
            if outcome is Outcome.KEEP:
                if eff == "SQ":
                    outcome = Outcome.RECURSE
                else:
                    append((tag, el.start, el.end, None))
                    continue
            if eff in REMEMBERED_VRS and outcome is not Outcome.KEEP_CLASS_UID:
                ctx.remember(buf[el.vstart : el.vend], None if nested else tag)
            elif not nested and eff in ("UI", "AS", "CS", "DS", "IS", "TM"):
                ctx.header[f"{tag:08X}"] = (
                    bytes(buf[el.vstart : el.vend]).strip(b" \x00").decode("latin-1")[:256]
                )
            if outcome is Outcome.REMOVE:
                continue
            if eff == "SQ":
                if outcome is Outcome.EMPTY:
                    append((tag, 0, 0, _header(tag, vr, 0, enc)))
                else:
                    append((tag, 0, 0, self._sequence(ctx, el, enc, depth)))
                continue
            raw = bytes(buf[el.vstart : el.vend])
            if outcome is Outcome.EMPTY:
                append((tag, 0, 0, _header(tag, vr, 0, enc)))
            elif outcome is Outcome.MAP_UID:
                if self.options.retain_uids:
                    append((tag, el.start, el.end, None))
                else:
                    append((tag, 0, 0, _element(tag, vr, self._map_uids(ctx, raw, True), enc)))
            elif outcome is Outcome.KEEP_CLASS_UID:
                values = split_values(raw)
                if all(not v or is_standard_uid(v) for v in values):
                    append((tag, el.start, el.end, None))
                else:
                    append((tag, 0, 0, _element(tag, vr, self._map_uids(ctx, raw, True), enc)))
            elif outcome is Outcome.SHIFT:
                try:
                    value = shift_dates(raw, eff, ctx.shift)
                except ReplacementError:
                    value = b""
                    ctx.notes.append(
                        f"({group:04X},{tag & 0xFFFF:04X}) held an unparseable date: emptied"
                    )
                append((tag, 0, 0, _element(tag, vr, value, enc)))
            elif outcome is Outcome.DUMMY:
                append((tag, 0, 0, _element(tag, vr, dummy(eff), enc)))
            elif outcome is Outcome.PSEUDONYM:
                if not nested:
                    continue  # the top level gets the patient's pseudonym injected
                if tag == PATIENT_ID and raw.strip(b" \x00"):
                    value = self.keyed.pseudonym(raw.strip(b" \x00"))
                    append((tag, 0, 0, _element(tag, vr, value, enc)))
                else:
                    append((tag, 0, 0, _header(tag, vr, 0, enc)))
            else:  # pragma: no cover - resolve() returns only the outcomes above
                raise DeidError("internal", f"no rule for outcome {outcome!r}")
        if used_creators:
            for key in used_creators:
                creator_el = creators[key][1]
                append((creator_el.tag, creator_el.start, creator_el.end, None))
            out.sort(key=lambda e: e[0])
        return out

    def _private(
        self,
        ctx: _Context,
        el: Element,
        creators: dict[tuple[int, int], tuple[str, Element]],
        used: set[tuple[int, int]],
        out: list[tuple[int, int, int, bytes | None]],
    ) -> None:
        group = el.tag >> 16
        elem = el.tag & 0xFFFF
        if elem < 0x0010:
            return
        if elem <= 0x00FF:
            name = bytes(ctx.buf[el.vstart : el.vend]).strip(b" \x00").decode("latin-1")
            creators[(group, elem)] = (name, el)
            return
        if not self.options.retain_safe_private:
            if el.vr in REMEMBERED_VRS:
                ctx.remember(ctx.buf[el.vstart : el.vend])
            return
        if not self._keep_private(ctx, el, creators, used, out) and el.vr in REMEMBERED_VRS:
            ctx.remember(ctx.buf[el.vstart : el.vend])

    def _keep_private(
        self,
        ctx: _Context,
        el: Element,
        creators: dict[tuple[int, int], tuple[str, Element]],
        used: set[tuple[int, int]],
        out: list[tuple[int, int, int, bytes | None]],
    ) -> bool:
        """Keep a private data element if it is on the safe-private allowlist."""
        group = el.tag >> 16
        elem = el.tag & 0xFFFF
        block = (group, elem >> 8)
        creator = creators.get(block)
        if creator is None or el.vr == "SQ":
            return False
        low = elem & 0xFF
        vr = el.vr
        if vr == "UN" or vr == "":
            vrs = [k[3] for k in self.profile.safe_private if k[:3] == (creator[0], group, low)]
            if len(vrs) != 1 or not _plausible(ctx.buf[el.vstart : el.vend], vrs[0]):
                return False
            vr = vrs[0]
        if self.profile.keeps_private((creator[0], group, low, vr)):
            used.add(block)
            out.append((el.tag, el.start, el.end, None))
            return True
        return False

    def _sequence(self, ctx: _Context, el: Element, enc: Encoding, depth: int) -> bytes:
        """Rewrite a sequence item by item, keeping its length style."""
        inner = io.IMPLICIT_LE_ENC if el.vr == "UN" else enc
        p = io.packing(inner)
        parts: list[bytes | memoryview] = []
        for item in io.items_of(ctx.buf, el, inner, depth + 1):
            elements = io.item_elements(ctx.buf, item, inner, depth + 1)
            body = self._assemble(ctx, self._dataset(ctx, elements, inner, depth + 1))
            length = sum(len(b) for b in body)
            if item.undefined:
                parts.append(p.tag.pack(0xFFFE, 0xE000) + p.u32.pack(io.UNDEFINED))
                parts.extend(body)
                parts.append(p.tag.pack(0xFFFE, 0xE00D) + p.u32.pack(0))
            else:
                parts.append(p.tag.pack(0xFFFE, 0xE000) + p.u32.pack(length))
                parts.extend(body)
        value = b"".join(parts)
        vr = el.vr if not enc.implicit else "SQ"
        if el.undefined:
            delimiter = p.tag.pack(0xFFFE, 0xE0DD) + p.u32.pack(0)
            return _header(el.tag, vr, io.UNDEFINED, enc) + value + delimiter
        return _header(el.tag, vr, len(value), enc) + value

    @staticmethod
    def _spans(entries: list[tuple[int, int, int, bytes | None]]) -> list[Piece]:
        """Entries to pieces, merging spans that are adjacent in the input."""
        pieces: list[Piece] = []
        span_start = span_end = -1
        for _tag, start, end, data in entries:
            if data is None:
                if start == span_end:
                    span_end = end
                    continue
                if span_end > span_start:
                    pieces.append((span_start, span_end - span_start))
                span_start, span_end = start, end
            else:
                if span_end > span_start:
                    pieces.append((span_start, span_end - span_start))
                    span_start = span_end = -1
                pieces.append(data)
        if span_end > span_start:
            pieces.append((span_start, span_end - span_start))
        return pieces

    @classmethod
    def _assemble(
        cls, ctx: _Context, entries: list[tuple[int, int, int, bytes | None]]
    ) -> list[bytes | memoryview]:
        """Entries to buffers (spans as views of the input)."""
        view = memoryview(ctx.buf) if not isinstance(ctx.buf, memoryview) else ctx.buf
        return [
            p if isinstance(p, bytes) else view[p[0] : p[0] + p[1]] for p in cls._spans(entries)
        ]

    # -- the file -------------------------------------------------------------------

    def deidentify(self, data: bytes | memoryview) -> DeidResult:
        """De-identify one file's bytes. Raises DicomFormatError or DeidError."""
        part = io.split_part10(data)
        try:
            elements, _ = io.read_dataset(part.dataset, part.start, len(part.dataset), part.enc)
        except DicomFormatError as first:
            if part.enc.implicit or not part.enc.little or first.position != part.start:
                raise  # only a data set whose very first element is not explicit VR
            # Some writers declare explicit VR and write implicit: read it as it is.
            try:
                elements, _ = io.read_dataset(
                    part.dataset, part.start, len(part.dataset), io.IMPLICIT_LE_ENC
                )
            except DicomFormatError:
                raise first from None
            if part.transfer_syntax not in (io.EXPLICIT_VR_LE, io.IMPLICIT_VR_LE):
                raise DicomFormatError(
                    "malformed",
                    f"data set is implicit VR but transfer syntax {part.transfer_syntax} "
                    "requires explicit VR",
                ) from None
            part.enc = io.IMPLICIT_LE_ENC
            part.transfer_syntax = io.IMPLICIT_VR_LE
        check_pixels(part.dataset, elements, part.enc, part.transfer_syntax)
        buf = part.dataset
        top: dict[int, bytes] = {}
        for el in elements:
            if el.tag in _READ_AT_TOP and el.tag not in top and el.vr != "SQ":
                top[el.tag] = bytes(buf[el.vstart : el.vend]).strip(b" \x00")
        for tag, name in (
            (SOP_INSTANCE_UID, "SOP Instance UID"),
            (STUDY_INSTANCE_UID, "Study Instance UID"),
            (SERIES_INSTANCE_UID, "Series Instance UID"),
        ):
            if not top.get(tag):
                raise DicomFormatError("malformed", f"missing {name}")
        sop_class = top.get(SOP_CLASS_UID) or part.meta.get(0x00020002, b"").strip(b" \x00")
        if not sop_class:
            raise DicomFormatError("malformed", "missing SOP Class UID")
        sop_class_str = sop_class.decode("ascii", "replace")
        patient_key = _patient_key(top)
        ctx = _Context(
            buf=buf,
            iod=iod_index(sop_class_str),
            pseudonym=self.keyed.pseudonym(patient_key),
            shift=self.keyed.shift_days(patient_key),
        )
        ctx.overlays_kept = self.options.clean_graphics and any(
            (el.tag >> 16) & 0xFF01 in (0x5000, 0x6000)
            and (el.tag >> 16) <= 0x601E
            and (el.tag & 0xFFFF) == 0x3000
            for el in elements
        )
        entries = self._dataset(ctx, elements, part.enc, 0)
        entries.extend(self._generated(ctx, part.enc))
        entries.sort(key=lambda e: e[0])
        attributes = _index_attributes(buf, entries, part.enc)
        body = self._spans(entries)

        def new_uid_of(original: bytes) -> bytes:
            if self.options.retain_uids or is_standard_uid(original):
                return original
            return ctx.uids.get(original) or self.keyed.uid(original)

        def new_uid(tag: int) -> bytes:
            return new_uid_of(top[tag])

        sop_uid, study_uid, series_uid = (
            new_uid(SOP_INSTANCE_UID),
            new_uid(STUDY_INSTANCE_UID),
            new_uid(SERIES_INSTANCE_UID),
        )
        for uid, name in (
            (sop_uid, "SOP Instance UID"),
            (study_uid, "Study Instance UID"),
            (series_uid, "Series Instance UID"),
        ):
            if not is_uid(uid):  # only possible with Retain UIDs; the value is not echoed
                raise DicomFormatError("malformed", f"{name} is not a valid UID")
        # The meta names the class exactly as the data set now does (a private class
        # UID is mapped like any other non-standard UID).
        meta = _meta(new_uid_of(sop_class), sop_uid, part.transfer_syntax.encode("ascii"))
        if part.deflated:
            view = memoryview(buf)
            inflated = b"".join(
                p if isinstance(p, bytes) else view[p[0] : p[0] + p[1]] for p in body
            )
            # Level 6 (zlib default): dicom3tools misreads some level-9 streams.
            compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            body = [compressor.compress(inflated) + compressor.flush()]
        pieces: list[Piece] = [meta, *body]
        pseudonym = ctx.pseudonym.decode("ascii")
        relpath = (
            f"{pseudonym}/{study_uid.decode('ascii')}/{series_uid.decode('ascii')}/"
            f"{sop_uid.decode('ascii')}.dcm"
        )
        record = {
            "sop_instance_uid": [top[SOP_INSTANCE_UID].decode("latin-1"), sop_uid.decode()],
            "study_instance_uid": [top[STUDY_INSTANCE_UID].decode("latin-1"), study_uid.decode()],
            "series_instance_uid": [
                top[SERIES_INSTANCE_UID].decode("latin-1"),
                series_uid.decode(),
            ],
            "patient_id": top.get(PATIENT_ID, b"").decode("latin-1"),
            "patient_name": top.get(PATIENT_NAME, b"").decode("latin-1"),
            "accession_number": top.get(ACCESSION_NUMBER, b"").decode("latin-1"),
            "study_date": top.get(STUDY_DATE, b"").decode("latin-1"),
            "pseudonym": pseudonym,
            "date_shift_days": ctx.shift,
            "uids": sorted([k.decode("latin-1"), v.decode()] for k, v in ctx.uids.items()),
            "originals": list(ctx.originals),
            "header": ctx.header,
        }
        return DeidResult(
            pieces=pieces,
            source=buf,
            relpath=relpath,
            sop_instance_uid=sop_uid.decode(),
            study_instance_uid=study_uid.decode(),
            series_instance_uid=series_uid.decode(),
            pseudonym=pseudonym,
            sop_class_uid=sop_class_str,
            modality=top.get(MODALITY, b"").decode("ascii", "replace"),
            transfer_syntax=part.transfer_syntax,
            risk=_burned_in_risk(top, sop_class_str, ctx.overlays_kept),
            notes=ctx.notes,
            record=record,
            attributes=attributes,
        )

    def _method_values(self) -> bytes:
        opts = self.options
        values = [f"RADFED {SOFTWARE_VERSION} PROFILE {DEID_PROFILE_VERSION}", "PS3.15 E.1-1 BASIC"]
        values.extend(
            name.upper().replace("-", " ")[:64]
            for name in opts.names()
            if getattr(opts, name.replace("-", "_"))
        )
        return "\\".join(values).encode("ascii")

    def _generated(self, ctx: _Context, enc: Encoding) -> list[tuple[int, int, int, bytes | None]]:
        """The patient's pseudonym and the de-identification method attributes."""
        opts = self.options
        if opts.retain_longitudinal_full_dates:
            temporal = b"UNMODIFIED"
        elif opts.retain_longitudinal_modified_dates:
            temporal = b"MODIFIED"
        else:
            temporal = b"REMOVED"
        p = io.packing(enc)
        items = []
        for value, meaning in opts.method_codes():
            body = (
                _element(0x00080100, "SH", value.encode("ascii"), enc)
                + _element(0x00080102, "SH", b"DCM", enc)
                + _element(0x00080104, "LO", meaning.encode("ascii"), enc)
            )
            items.append(p.tag.pack(0xFFFE, 0xE000) + p.u32.pack(len(body)) + body)
        codes = b"".join(items)
        return [
            (PATIENT_NAME, 0, 0, _element(PATIENT_NAME, "PN", ctx.pseudonym, enc)),
            (PATIENT_ID, 0, 0, _element(PATIENT_ID, "LO", ctx.pseudonym, enc)),
            (0x00120062, 0, 0, _element(0x00120062, "CS", b"YES", enc)),
            (0x00120063, 0, 0, _element(0x00120063, "LO", self._method, enc)),
            (0x00120064, 0, 0, _header(0x00120064, "SQ", len(codes), enc) + codes),
            (0x00280303, 0, 0, _element(0x00280303, "CS", temporal, enc)),
        ]


#: Output attributes the node index records, by tag: (name, kind).
INDEX_TAGS: Final[dict[int, tuple[str, str]]] = {
    0x00080020: ("study_date", "text"),
    0x00080060: ("modality", "text"),
    0x00080070: ("manufacturer", "text"),
    0x00081090: ("model", "text"),
    0x00180015: ("body_part", "text"),
    0x00180050: ("slice_thickness", "float"),
    0x00200011: ("series_number", "int"),
    0x00200013: ("instance_number", "int"),
    0x00280004: ("photometric", "text"),
    0x00280008: ("number_of_frames", "int"),
    0x00280010: ("rows", "us"),
    0x00280011: ("columns", "us"),
    0x00280030: ("pixel_spacing", "float"),
}


def _index_attributes(
    buf: bytes | memoryview, entries: list[tuple[int, int, int, bytes | None]], enc: Encoding
) -> dict[str, str | int | float | None]:
    """The index values, read from what the output holds (shifted dates, kept values)."""
    out: dict[str, str | int | float | None] = {}
    for tag, start, end, data in entries:
        spec = INDEX_TAGS.get(tag)
        if spec is None:
            continue
        encoded = data if data is not None else bytes(buf[start:end])
        try:
            (element,), _ = io.read_dataset(encoded, 0, len(encoded), enc)
        except (DicomFormatError, ValueError):
            continue
        raw = encoded[element.vstart : element.vend]
        out[spec[0]] = _decode(raw, spec[1], enc)
    return out


def _decode(raw: bytes, kind: str, enc: Encoding) -> str | int | float | None:
    if kind == "us":
        if len(raw) < 2:
            return None
        return int(io.packing(enc).u16.unpack_from(raw, 0)[0])
    text = raw.split(b"\\")[0].strip(b" \x00").decode("latin-1")
    if not text:
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        return None
    return text


def _check_charset(raw: bytes | memoryview) -> None:
    """Refuse a Specific Character Set that no reader can look up (bytes outside a code
    string): it is kept in the output, which would then be unreadable."""
    value = bytes(raw).rstrip(b" \x00")
    if not _CHARSET_BYTES.issuperset(value):
        raise DicomFormatError(
            "bad_charset", f"Specific Character Set is not a code string: {value[:32]!r}"
        )


def _patient_key(top: dict[int, bytes]) -> bytes:
    """What identifies the patient for pseudonym and date shift."""
    patient_id = top.get(PATIENT_ID, b"")
    if patient_id:
        return b"id:" + patient_id
    name = top.get(PATIENT_NAME, b"")
    birth = top.get(PATIENT_BIRTH_DATE, b"")
    if name:
        return b"name:" + name + b"|" + birth
    return b"study:" + top[STUDY_INSTANCE_UID]


def _plausible(value: bytes | memoryview, vr: str) -> bool:
    """Whether implicit-VR private bytes can be the allowlisted VR."""
    raw = bytes(value)
    sizes = {"FD": 8, "FL": 4, "US": 2, "SS": 2, "UL": 4, "SL": 4}
    if vr in sizes:
        return len(raw) % sizes[vr] == 0
    if vr in ("IS", "DS"):
        return all(c in b"0123456789+-.eE \\" for c in raw)
    if vr == "CS":
        return all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _\\" for c in raw)
    return False


def _burned_in_risk(top: dict[int, bytes], sop_class: str, overlays_kept: bool) -> list[str]:
    """Why pixels may carry burned-in identity; empty when nothing suggests it."""
    reasons: list[str] = []
    burned = top.get(BURNED_IN_ANNOTATION, b"").upper()
    modality = top.get(MODALITY, b"").upper()
    image_type = {v.strip() for v in top.get(IMAGE_TYPE, b"").upper().split(b"\\")}
    if burned == b"YES":
        reasons.append("BurnedInAnnotation is YES")
    if top.get(RECOGNIZABLE_FEATURES, b"").upper() == b"YES":
        reasons.append("RecognizableVisualFeatures is YES")
    if sop_class.startswith(ENCAPSULATED_DOCUMENT_PREFIX):
        reasons.append("encapsulated document")
    if not burned:
        if modality == b"US" or sop_class in ULTRASOUND_CLASSES:
            reasons.append("ultrasound without BurnedInAnnotation")
        if modality in (b"SC", b"OT"):
            reasons.append(f"modality {modality.decode('ascii')} without BurnedInAnnotation")
        if sop_class.startswith(SECONDARY_CAPTURE_PREFIX):
            reasons.append("secondary capture without BurnedInAnnotation")
        for kind in (b"SCREEN SAVE", b"SECONDARY"):
            if kind in image_type:
                reasons.append(f"ImageType {kind.decode('ascii')} without BurnedInAnnotation")
    if overlays_kept:
        reasons.append("overlay planes kept (Clean Graphics)")
    return reasons


def _meta(sop_class: bytes, sop_instance: bytes, transfer_syntax: bytes) -> bytes:
    """Preamble, DICM and a rebuilt group 0002: nothing carried over from the source."""
    enc = io.EXPLICIT_LE_ENC
    body = (
        _header(0x00020001, "OB", 2, enc)
        + b"\x00\x01"
        + _element(0x00020002, "UI", sop_class, enc)
        + _element(0x00020003, "UI", sop_instance, enc)
        + _element(0x00020010, "UI", transfer_syntax, enc)
        + _element(0x00020012, "UI", IMPLEMENTATION_CLASS_UID, enc)
        + _element(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME, enc)
    )
    group_length = _header(0x00020000, "UL", 4, enc) + struct.pack("<L", len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body

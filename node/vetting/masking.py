"""Pixel masking: black out rectangles of burned-in text and record that it was done.

``mask_instance`` decodes the pixel data (any transfer syntax pydicom and the
pylibjpeg plugins decode: native, RLE, JPEG baseline/extended/lossless,
JPEG-LS, JPEG 2000), sets every rectangle to the image's darkest value on all
frames and samples, and writes the instance back uncompressed (Explicit VR
Little Endian) through a temporary file, fsync and rename. YCbCr comes out as
RGB, planar configuration 0; a JPEG baseline/extended source is marked lossy
(Lossy Image Compression "01") when it was not already. The SOP Instance UID
is kept (DESIGN: a masked image keeps its UID mapping) and the masking is
recorded: CID 7050 code 113101 "Clean Pixel Data Option" (DCM) in the
De-identification Method Code Sequence and "CLEAN PIXEL DATA" in
De-identification Method. Burned In Annotation becomes "NO" only when a fresh
OCR of every masked frame finds no text; otherwise it is "YES" and the result
lists what remains.

Device rules say where known devices burn text in, like CTP's
DicomPixelAnonymizer scripts. The packaged ``mask_rules.json`` holds examples
taken from that library; a site adds its own file in the same format::

    {
      "format": "radfed-mask-rules",
      "version": 1,
      "rules": [
        {
          "name": "what the layout is",          (required)
          "manufacturer": "SIEMENS",             (required; case-insensitive substring)
          "model": "S2000" | ["A400", "A500"],   (optional; any alternative, substring)
          "modality": "US",                      (optional; exact, case-insensitive)
          "image_type": "SECONDARY",             (optional; one of the Image Type values)
          "rows": 768, "columns": 1024,          (required; exact)
          "rectangles": [[0, 0, 1024, 60]],      (required; [left, top, width, height])
          "source": "where the layout comes from"
        }
      ]
    }

Substring matching ignores case, spaces and punctuation ("LOGIQ E9" matches
"LOGIQE9"). A rule matches when every field it names matches; ``rules_for``
returns the rectangles of every matching rule.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels.processing import apply_color_lut, convert_color_space
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit

from node.deid.engine import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.deid.runner import fsync_dir
from node.errors import NodeError
from node.vetting import ocr
from node.vetting.ocr import TextRegion
from protocols.deid.options import CLEAN_PIXEL_DATA_CODE

log = logging.getLogger("radfed.node.vetting.masking")

CLEAN_PIXEL_DATA_METHOD: Final = "CLEAN PIXEL DATA"
#: Transfer syntaxes that are lossy whatever their parameters, and the method to record.
LOSSY_METHODS: Final[dict[str, str]] = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
}
#: Byte width of the words of the binary VRs that a big endian file stores swapped.
SWAP_WIDTHS: Final[dict[str, int]] = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
YBR_DECODED_AS_RGB: Final = frozenset({"YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})


@dataclass(frozen=True)
class Rect:
    """A rectangle in frame pixels: ``left``, ``top`` (0-based), ``width``, ``height``."""

    left: int
    top: int
    width: int
    height: int

    def __post_init__(self) -> None:
        values = (self.left, self.top, self.width, self.height)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise NodeError("bad_rectangle", f'Argument "rectangles": {values} must be integers.')
        if self.left < 0 or self.top < 0 or self.width < 1 or self.height < 1:
            raise NodeError(
                "bad_rectangle",
                f'Argument "rectangles": {values} needs left, top >= 0 and width, height >= 1.',
            )

    @property
    def right(self) -> int:
        """The first column past the rectangle."""
        return self.left + self.width

    @property
    def bottom(self) -> int:
        """The first row below the rectangle."""
        return self.top + self.height

    def as_tuple(self) -> tuple[int, int, int, int]:
        """``(left, top, width, height)``, as rules files and the web UI write it."""
        return (self.left, self.top, self.width, self.height)

    def clip(self, rows: int, columns: int) -> Rect | None:
        """The part inside a ``rows`` x ``columns`` image; ``None`` when nothing is."""
        right, bottom = min(self.right, columns), min(self.bottom, rows)
        if right <= self.left or bottom <= self.top:
            return None
        return Rect(self.left, self.top, right - self.left, bottom - self.top)


@dataclass(frozen=True)
class MaskRule:
    """Where one device layout burns text in, and which instances have that layout."""

    name: str
    manufacturer: str
    rows: int
    columns: int
    rectangles: tuple[Rect, ...]
    models: tuple[str, ...] = ()
    modality: str | None = None
    image_type: str | None = None
    source: str = ""

    def matches(self, ds: Dataset) -> bool:
        """Whether ``ds`` (a header is enough) has this rule's device, kind and size."""
        try:
            size = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
        except (TypeError, ValueError):  # a broken header matches no device
            return False
        if size != (self.rows, self.columns):
            return False
        if _norm(self.manufacturer) not in _norm(ds.get("Manufacturer")):
            return False
        if self.models:
            model = _norm(ds.get("ManufacturerModelName"))
            if not any(_norm(m) in model for m in self.models):
                return False
        if self.modality and str(ds.get("Modality") or "").upper() != self.modality.upper():
            return False
        if self.image_type:
            kinds = ds.get("ImageType") or []
            values = [kinds] if isinstance(kinds, str) else list(kinds)
            if self.image_type.upper() not in {str(v).upper() for v in values}:
                return False
        return True


@dataclass(frozen=True)
class MaskResult:
    """What ``mask_instance`` did.

    ``clean`` is true only when the re-check ran and found no text; ``remaining`` is
    the text it found; ``rectangles`` are those applied (clipped to the image).
    """

    clean: bool
    remaining: tuple[TextRegion, ...]
    frames_masked: int
    transfer_syntax_in: str
    transfer_syntax_out: str
    rectangles: tuple[Rect, ...]
    rechecked: bool

    @property
    def transfer_syntax(self) -> str:
        """The transfer syntax of the written instance."""
        return self.transfer_syntax_out


def _norm(value: Any) -> str:
    return "".join(ch for ch in str(value or "").casefold() if ch.isalnum())


# ---------------------------------------------------------------------------------------------
# Rules


class _RuleEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    manufacturer: str = Field(min_length=1)
    model: str | list[str] | None = None
    modality: str | None = None
    image_type: str | None = None
    rows: int = Field(ge=1, le=65535)
    columns: int = Field(ge=1, le=65535)
    rectangles: list[tuple[int, int, int, int]] = Field(min_length=1)
    source: str = ""


class _RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["radfed-mask-rules"]
    version: Literal[1]
    rules: list[_RuleEntry]


def _parse_rules(text: str, origin: str) -> list[MaskRule]:
    try:
        parsed = _RulesFile.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise NodeError("bad_mask_rules", f"mask rules {origin}: not JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise NodeError("bad_mask_rules", f"mask rules {origin}: {problems}") from exc
    rules = []
    for number, entry in enumerate(parsed.rules):
        try:
            rects = tuple(Rect(*r) for r in entry.rectangles)
        except NodeError as exc:
            raise NodeError(
                "bad_mask_rules", f"mask rules {origin}: rules.{number}: {exc.message}"
            ) from exc
        for rect in rects:
            if rect.right > entry.columns or rect.bottom > entry.rows:
                raise NodeError(
                    "bad_mask_rules",
                    f"mask rules {origin}: rules.{number} ({entry.name}): rectangle "
                    f"{list(rect.as_tuple())} leaves the {entry.columns}x{entry.rows} image",
                )
        models = (entry.model,) if isinstance(entry.model, str) else tuple(entry.model or ())
        rules.append(
            MaskRule(
                name=entry.name,
                manufacturer=entry.manufacturer,
                rows=entry.rows,
                columns=entry.columns,
                rectangles=rects,
                models=models,
                modality=entry.modality,
                image_type=entry.image_type,
                source=entry.source,
            )
        )
    return rules


def load_rules(path: Path | None = None, *, builtin: bool = True) -> list[MaskRule]:
    """The packaged device rules, followed by those of a site's rules file at ``path``."""
    rules: list[MaskRule] = []
    if builtin:
        packaged = resources.files(__package__ or "node.vetting").joinpath("mask_rules.json")
        try:
            text = packaged.read_text(encoding="utf-8")
        except OSError as exc:
            raise NodeError(
                "bad_mask_rules", f"the packaged mask_rules.json is missing (package data?): {exc}"
            ) from exc
        rules.extend(_parse_rules(text, "mask_rules.json"))
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise NodeError(
                "bad_mask_rules", f'Argument "path": cannot read mask rules {path}: {exc}'
            ) from exc
        rules.extend(_parse_rules(text, str(path)))
    return rules


def rules_for(ds: Dataset, rules: Iterable[MaskRule]) -> list[Rect]:
    """The rectangles of every rule that matches ``ds`` (a header is enough), without repeats."""
    found: list[Rect] = []
    for rule in rules:
        if rule.matches(ds):
            log.debug("mask rule %r matches", rule.name)
            found.extend(r for r in rule.rectangles if r not in found)
    return found


def rects_for_regions(regions: Iterable[TextRegion], margin: int = 3) -> list[Rect]:
    """Rectangles that cover OCR regions with ``margin`` pixels around (anti-aliased edges)."""
    if margin < 0:
        raise NodeError("bad_argument", f'Argument "margin" must be >= 0, not {margin}.')
    found: list[Rect] = []
    for region in regions:
        left, top = max(0, region.left - margin), max(0, region.top - margin)
        rect = Rect(left, top, region.right + margin - left, region.bottom + margin - top)
        if rect not in found:
            found.append(rect)
    return found


# ---------------------------------------------------------------------------------------------
# Masking


def mask_instance(
    source: Path, target: Path, rectangles: list[Rect], recheck: bool = True
) -> MaskResult:
    """Mask ``rectangles`` on every frame of ``source`` and write the result to ``target``.

    Parameters
    ----------
    source, target
        DICOM files; they may be the same path (the write is atomic).
    rectangles
        In frame pixels; parts outside the image are dropped.
    recheck
        OCR every masked frame; only a re-check that finds nothing sets Burned In
        Annotation to "NO" and makes the result ``clean``.
    """
    if not rectangles:
        raise NodeError("bad_argument", 'Argument "rectangles" must hold at least one rectangle.')
    ds = ocr.read_dataset(Path(source))
    with ocr.bad_input():
        syntax_in = ocr.transfer_syntax(ds)
        applied = _applicable(rectangles, int(ds.Rows), int(ds.Columns))
        frames = _mask_pixels(ds, applied, syntax_in)
    _record_masking(ds)

    remaining: tuple[TextRegion, ...] = ()
    if recheck:
        remaining = tuple(ocr.find_text(ds, frames=range(frames)))
        ds.BurnedInAnnotation = "YES" if remaining else "NO"
        if remaining:
            log.info(
                "masked %s: text remains (%s)",
                ds.get("SOPInstanceUID"),
                "; ".join(r.text for r in remaining)[:200],
            )
    _write_atomically(ds, Path(target))
    return MaskResult(
        clean=recheck and not remaining,
        remaining=remaining,
        frames_masked=frames,
        transfer_syntax_in=str(syntax_in),
        transfer_syntax_out=str(ExplicitVRLittleEndian),
        rectangles=tuple(applied),
        rechecked=recheck,
    )


def _applicable(rectangles: list[Rect], rows: int, columns: int) -> list[Rect]:
    """The rectangles clipped to the image; one wholly outside it is an error."""
    applied: list[Rect] = []
    for rect in rectangles:
        if not isinstance(rect, Rect):
            raise NodeError("bad_rectangle", f'Argument "rectangles" holds {rect!r}, not a Rect.')
        clipped = rect.clip(rows, columns)
        if clipped is None:
            raise NodeError(
                "bad_rectangle",
                f'Argument "rectangles": {list(rect.as_tuple())} lies outside the '
                f"{columns}x{rows} image.",
            )
        applied.append(clipped)
    return applied


def _mask_pixels(ds: Dataset, applied: list[Rect], syntax_in: UID) -> int:
    """Decode, fill the rectangles with the darkest value, store natively; the frame count."""
    rows, columns = int(ds.Rows), int(ds.Columns)
    frames = ocr.frame_count(ds)
    arr, photometric = ocr.decode(ds)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # a plugin that left YCbCr as it was
        arr = convert_color_space(arr, photometric, "RGB")
    if photometric in YBR_DECODED_AS_RGB:
        photometric = "RGB"
    stack = np.ascontiguousarray(arr).reshape(frames, rows, columns, samples)
    fill = _darkest(ds, stack, photometric)
    for rect in applied:
        stack[:, rect.top : rect.bottom, rect.left : rect.right, :] = fill
    _store_pixels(ds, stack, photometric, syntax_in)
    return frames


def _darkest(ds: Dataset, stack: npt.NDArray[Any], photometric: str) -> npt.NDArray[Any]:
    """The stored value(s) that display darkest: one per sample."""
    if photometric == "PALETTE COLOR":
        used = np.unique(stack)
        rgb = np.asarray(apply_color_lut(used, ds), dtype=np.float64).reshape(-1, 3)
        luma = rgb @ np.array([0.299, 0.587, 0.114])
        return np.array([used[int(np.argmin(luma))]], dtype=stack.dtype)
    if stack.shape[-1] > 1:
        result: npt.NDArray[Any] = stack.min(axis=(0, 1, 2))
        return result
    high_is_dark = photometric == "MONOCHROME1"
    slope = ds.get("RescaleSlope")
    if slope is not None and float(slope) < 0:
        high_is_dark = not high_is_dark
    value = stack.max() if high_is_dark else stack.min()
    return np.array([value], dtype=stack.dtype)


def _store_pixels(ds: Dataset, stack: npt.NDArray[Any], photometric: str, syntax_in: UID) -> None:
    """Replace the pixel data with ``stack``, native little endian, and fix the header."""
    bits = int(ds.BitsAllocated)
    if bits == 1:
        data = pack_bits(stack.ravel())
    else:
        kind = "i" if int(ds.get("PixelRepresentation") or 0) else "u"
        dtype = np.dtype(f"<{kind}{bits // 8}")
        data = stack.astype(dtype, copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    del ds.PixelData
    ds.add_new(0x7FE00010, "OB" if bits <= 8 else "OW", data)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PhotometricInterpretation = photometric
    if stack.shape[-1] > 1:
        ds.PlanarConfiguration = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    method = LOSSY_METHODS.get(str(syntax_in))
    if method is not None:
        if ds.get("LossyImageCompression") != "01":
            ds.LossyImageCompression = "01"
        if not ds.get("LossyImageCompressionMethod"):
            ds.LossyImageCompressionMethod = method


def _record_masking(ds: Dataset) -> None:
    """Add the Clean Pixel Data Option to the de-identification method attributes."""
    current = ds.get("DeidentificationMethod")
    methods = [] if not current else [current] if isinstance(current, str) else list(current)
    if CLEAN_PIXEL_DATA_METHOD not in methods:
        methods.append(CLEAN_PIXEL_DATA_METHOD)
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    if "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethodCodeSequence = Sequence()
    code, meaning = CLEAN_PIXEL_DATA_CODE
    items = ds.DeidentificationMethodCodeSequence
    if not any(
        i.get("CodeValue") == code and i.get("CodingSchemeDesignator") == "DCM" for i in items
    ):
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        items.append(item)


def _to_little_endian(ds: Dataset) -> None:
    """Byte-swap the words of OW/OL/OF/OD/OV values read from a big endian file.

    pydicom converts numbers on reading but keeps these as the bytes it read; the
    pixel data has already been replaced with little endian words.
    """
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _to_little_endian(item)
        elif elem.tag != 0x7FE00010 and elem.VR in SWAP_WIDTHS and isinstance(elem.value, bytes):
            width = SWAP_WIDTHS[elem.VR]
            usable = len(elem.value) - len(elem.value) % width
            words = np.frombuffer(elem.value[:usable], dtype=f">u{width}")
            elem.value = words.astype(f"<u{width}").tobytes() + elem.value[usable:]


def _write_atomically(ds: Dataset, target: Path) -> None:
    """Write ``ds`` as a Part 10 file: temporary file, fsync, rename, fsync of the folder."""
    if ds.original_encoding[1] is False:
        _to_little_endian(ds)
    ds.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID.decode("ascii"))
    ds.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME.decode("ascii")
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fh:
            # dcmwrite, not save_as: save_as refuses to turn big endian into little endian.
            dcmwrite(fh, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise NodeError(
            "write_failed", f'Argument "target": cannot write {target}: {exc}', retryable=True
        ) from exc
    except (ValueError, AttributeError, TypeError) as exc:
        tmp.unlink(missing_ok=True)
        raise NodeError("bad_dicom", f"cannot write the masked instance: {exc}") from exc
    fsync_dir(target.parent)

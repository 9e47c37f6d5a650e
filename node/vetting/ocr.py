"""Burned-in text: render an instance's frames as 8-bit images and find text in them.

``render`` turns one frame into what a viewer would show: the Modality LUT or
rescale slope/intercept, then the VOI LUT or the first window centre/width
(the frame's own values in enhanced multi-frame objects; the frame's minimum
and maximum when the header has neither), MONOCHROME1 inverted; colour
(RGB, YBR decoded to RGB, palette) comes out as RGB. ``thumbnail_png`` is the
same image scaled down for the web UI.

``find_text`` runs Tesseract (tesserocr, one engine per process behind a
lock) in sparse-text mode on every frame — or, for cines longer than
``MAX_OCR_FRAMES``, on an even sample that always holds the first and last
frame (``sample_frames``). Images under ``OCR_MIN_SIDE`` pixels are upscaled
first so that 8–12 pixel text is read. Words that are empty, have no letter or
digit, or score under ``MIN_WORD_CONFIDENCE`` are noise; the kept words of a
text line make one ``TextRegion`` in pixel coordinates of the original frame,
kept when it holds at least three letters or digits (identifiers, names and dates
are longer; speckle yields two-character junk). Text seen at the same place
on several frames is reported once, its box the union of the sightings.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import UID

from node.errors import NodeError

log = logging.getLogger("radfed.node.vetting.ocr")

#: Debian's ``tesseract-ocr-eng`` data; tesserocr's own default path when it is absent.
TESSDATA_DIR: Final = Path("/usr/share/tesseract-ocr/5/tessdata/")
#: Cines longer than this are sampled (first, last and evenly spaced frames).
MAX_OCR_FRAMES: Final = 32
#: Images whose longer side is under this are upscaled (integer factor, at most 4).
OCR_MIN_SIDE: Final = 1024
MAX_UPSCALE: Final = 4
MIN_WORD_CONFIDENCE: Final = 50.0
MIN_REGION_CHARACTERS: Final = 3
#: A region must hold a word: a run of at least three letters or digits.
_WORD: Final = re.compile(r"[^\W_]{3,}")
#: Burned-in text is at least this tall in image pixels (device banners use 8 and more).
MIN_TEXT_HEIGHT: Final = 6
#: Two sightings on different frames are one region when their boxes overlap this much (IoU).
SAME_PLACE_IOU: Final = 0.5

Source = Dataset | bytes | Path | str

U8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class TextRegion:
    """Text found in the pixels: its box in frame pixels, what it reads and how sure OCR is.

    ``frame`` is the first frame it was seen on and ``frames`` every frame OCR saw it on.
    """

    left: int
    top: int
    width: int
    height: int
    text: str
    confidence: float
    frame: int = 0
    frames: tuple[int, ...] = ()

    @property
    def right(self) -> int:
        """The first column past the box."""
        return self.left + self.width

    @property
    def bottom(self) -> int:
        """The first row below the box."""
        return self.top + self.height


# ---------------------------------------------------------------------------------------------
# Reading and decoding


def read_dataset(source: Source) -> Dataset:
    """Return ``source`` as a pydicom dataset (read whole when given bytes or a path)."""
    if isinstance(source, Dataset):
        return source
    try:
        if isinstance(source, bytes):
            return pydicom.dcmread(io.BytesIO(source), force=False)
        return pydicom.dcmread(Path(source), force=False)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise NodeError(
            "bad_dicom", f'Argument "source" is not a readable DICOM file: {exc}'
        ) from exc


@contextmanager
def bad_input() -> Iterator[None]:
    """Turn what a malformed header makes pydicom or numpy raise into a ``bad_dicom`` error."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise NodeError(
            "bad_dicom", f'Argument "source" has a header that cannot be used: {exc}'
        ) from exc


def transfer_syntax(ds: Dataset) -> UID:
    """The dataset's Transfer Syntax UID (from its file meta)."""
    meta = getattr(ds, "file_meta", None)
    value = meta.get("TransferSyntaxUID") if meta is not None else None
    if not value:
        raise NodeError(
            "bad_dicom", 'Argument "source" has no Transfer Syntax UID in its file meta.'
        )
    return UID(str(value))


def frame_count(ds: Dataset) -> int:
    """How many frames the instance's pixel data holds."""
    _require_pixels(ds)
    return max(1, int(get_nr_frames(ds, warn=False)))


def _require_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds:
        raise NodeError("no_pixel_data", 'Argument "source" has no Pixel Data (7FE0,0010).')


def decode(ds: Dataset, index: int | None = None) -> tuple[npt.NDArray[Any], str]:
    """Decode one frame (``index``) or all of them, YCbCr converted to RGB.

    Returns
    -------
    tuple
        The array (frames first when all are decoded and there are several) and the
        photometric interpretation of what it holds.
    """
    _require_pixels(ds)
    syntax = transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise NodeError(
            "undecodable_pixels", f"no pixel decoder for transfer syntax {syntax} ({syntax.name})"
        ) from exc
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        raise NodeError(
            "undecodable_pixels", f"the {syntax.name} decoder lacks its plugins: {missing}"
        )
    try:
        # pydicom types each decoding option as the whole options dict: pass them as one.
        options: dict[str, Any] = {"as_rgb": True}
        arr, meta = decoder.as_array(ds, index=index, **options)
    except Exception as exc:  # plugins raise anything on a broken stream
        raise NodeError(
            "undecodable_pixels", f"cannot decode the pixel data ({syntax.name}): {exc}"
        ) from exc
    photometric = str(meta.get("photometric_interpretation", ds.get("PhotometricInterpretation")))
    return arr, photometric


# ---------------------------------------------------------------------------------------------
# Rendering


def render(source: Source, frame: int = 0) -> U8Array:
    """Render one frame as a viewer shows it: 8-bit, (rows, columns) or (rows, columns, 3) RGB."""
    ds = read_dataset(source)
    with bad_input():
        frames = frame_count(ds)
        if not 0 <= frame < frames:
            raise NodeError("bad_frame", f'Argument "frame" must be 0..{frames - 1}, not {frame}.')
        arr, photometric = decode(ds, index=frame)
        return render_array(ds, arr, photometric, frame)


def render_array(ds: Dataset, arr: npt.NDArray[Any], photometric: str, frame: int = 0) -> U8Array:
    """Render an already decoded frame of ``ds`` (see ``render``)."""
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _to_u8(rgb, 8 * rgb.itemsize)
    if arr.ndim == 3:
        return _to_u8(arr, int(ds.get("BitsStored", 8 * arr.itemsize)))
    values = _modality(ds, arr, frame)
    out = _voi(ds, values, frame)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return out


def _to_u8(arr: npt.NDArray[Any], bits: int) -> U8Array:
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    top = float(2 ** min(max(bits, 1), 16) - 1)
    if bits > 8 and float(arr.max(initial=0)) <= 255:
        top = 255.0  # 16-bit palettes that only use 8-bit values
    scaled = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255)
    return np.rint(scaled).astype(np.uint8)


def _frame_item(ds: Dataset, frame: int, keyword: str) -> Dataset | None:
    """The frame's functional group item ``keyword`` (per-frame first, then shared)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        seq = per_frame[frame].get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            shared_item: Dataset = seq[0]
            return shared_item
    return None


def _first_number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    return float(value[0]) if len(value) else None


def _modality(ds: Dataset, arr: npt.NDArray[Any], frame: int) -> npt.NDArray[np.float64]:
    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    holder = _frame_item(ds, frame, "PixelValueTransformationSequence") or ds
    slope = _first_number(holder.get("RescaleSlope"))
    intercept = _first_number(holder.get("RescaleIntercept"))
    values = arr.astype(np.float64)
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def _voi(ds: Dataset, values: npt.NDArray[np.float64], frame: int) -> U8Array:
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq and "LUTData" in voi_seq[0] and "LUTDescriptor" in voi_seq[0]:
        lut = np.asarray(voi_seq[0].LUTData, dtype=np.float64)
        mapped = apply_voi(np.rint(values).astype(np.int64), ds, 0).astype(np.float64)
        return _stretch(mapped, float(lut.min()), float(lut.max()))
    holder = _frame_item(ds, frame, "FrameVOILUTSequence") or ds
    center = _first_number(holder.get("WindowCenter"))
    width = _first_number(holder.get("WindowWidth"))
    function = str(holder.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if center is not None and width is not None:
        if function == "SIGMOID" and width > 0:
            out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
            return np.rint(out).astype(np.uint8)
        if function == "LINEAR_EXACT" and width > 0:
            return _stretch(values, center - width / 2, center + width / 2)
        if width >= 1:
            low = center - 0.5 - (width - 1) / 2
            high = center - 0.5 + (width - 1) / 2
            return _stretch(values, low, high)
        log.warning("window width %s is invalid for %s; using the frame's range", width, function)
    return _stretch(values, float(values.min()), float(values.max()))


def _stretch(values: npt.NDArray[np.float64], low: float, high: float) -> U8Array:
    if high <= low:
        return np.where(values > low, 255, 0).astype(np.uint8)
    out = np.clip((values - low) * (255.0 / (high - low)), 0, 255)
    return np.rint(out).astype(np.uint8)


def thumbnail_png(source: Source, frame: int = 0, size: int = 256) -> bytes:
    """A PNG of the rendered frame, at most ``size`` pixels on its longer side."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise NodeError("bad_size", f'Argument "size" must be a positive integer, not {size!r}.')
    image = Image.fromarray(render(source, frame))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# OCR


class _Engine:
    """The process's one Tesseract API, created on first use and used under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.api: Any = None

    def get(self) -> Any:
        if self.api is None:
            try:
                from tesserocr import PSM, PyTessBaseAPI  # type: ignore[import-untyped]
            except ImportError as exc:
                raise NodeError("ocr_unavailable", f"tesserocr is not installed: {exc}") from exc
            kwargs: dict[str, Any] = {"lang": "eng", "psm": PSM.SPARSE_TEXT}
            if TESSDATA_DIR.is_dir():
                kwargs["path"] = str(TESSDATA_DIR)
            try:
                api = PyTessBaseAPI(**kwargs)
            except RuntimeError as exc:
                raise NodeError(
                    "ocr_unavailable",
                    f"Tesseract cannot start (English data in {TESSDATA_DIR}?): {exc}",
                ) from exc
            api.SetVariable("debug_file", os.devnull)
            self.api = api
        return self.api


_ENGINE = _Engine()


def _reset_after_fork() -> None:
    global _ENGINE
    _ENGINE = _Engine()


os.register_at_fork(after_in_child=_reset_after_fork)


def sample_frames(count: int, limit: int = MAX_OCR_FRAMES) -> list[int]:
    """Frames to OCR: all of them up to ``limit``, else evenly spaced ones plus the last."""
    if count < 1:
        raise NodeError("bad_frame", f'Argument "count" must be at least 1, not {count}.')
    if limit < 2:
        raise NodeError("bad_argument", f'Argument "limit" must be at least 2, not {limit}.')
    if count <= limit:
        return list(range(count))
    step = math.ceil((count - 1) / (limit - 1))
    picked = list(range(0, count, step))
    if picked[-1] != count - 1:
        picked.append(count - 1)
    return picked


def ocr_image(image: U8Array) -> list[TextRegion]:
    """OCR one 8-bit image (grey or RGB); regions in its own pixel coordinates, frame 0."""
    grey = _ocr_grey(image)
    rows, columns = grey.shape
    scale = 1
    longest = max(rows, columns)
    if longest < OCR_MIN_SIDE:
        scale = min(MAX_UPSCALE, math.ceil(OCR_MIN_SIDE / longest))
    if scale > 1:
        pil = Image.fromarray(grey).resize(
            (columns * scale, rows * scale), Image.Resampling.BICUBIC
        )
        grey = np.ascontiguousarray(np.asarray(pil, dtype=np.uint8))
    height, width = grey.shape
    started = time.perf_counter()
    with _ENGINE.lock:
        api = _ENGINE.get()
        api.SetImageBytes(grey.tobytes(), width, height, 1, width)
        api.Recognize()
        lines = list(_lines(api))
        api.Clear()
    log.debug(
        "OCR of %dx%d (x%d): %.0f ms, %d line(s)",
        columns,
        rows,
        scale,
        (time.perf_counter() - started) * 1000,
        len(lines),
    )
    regions = []
    for words in lines:
        text = " ".join(w for w, _, _ in words)
        if sum(ch.isalnum() for ch in text) < MIN_REGION_CHARACTERS:
            continue
        if not _WORD.search(text):
            continue  # no run of three letters or digits: speckle read as "a8 8", "on”"
        x1 = min(b[0] for _, _, b in words) // scale
        y1 = min(b[1] for _, _, b in words) // scale
        x2 = min(columns, math.ceil(max(b[2] for _, _, b in words) / scale))
        y2 = min(rows, math.ceil(max(b[3] for _, _, b in words) / scale))
        if y2 - y1 < MIN_TEXT_HEIGHT:
            continue  # shorter than any legible burned-in text: texture, not letters
        confidence = sum(c for _, c, _ in words) / len(words)
        regions.append(TextRegion(x1, y1, x2 - x1, y2 - y1, text, round(confidence, 1)))
    return regions


def _ocr_grey(image: U8Array) -> U8Array:
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    # The brightest channel, not luma: saturated blue or red text on black stays bright.
    return np.ascontiguousarray(image[..., :3].max(axis=-1))


Word = tuple[str, float, tuple[int, int, int, int]]


def _lines(api: Any) -> Iterator[list[Word]]:
    """The recognised words that are not noise, grouped by text line."""
    from tesserocr import RIL, iterate_level

    line: list[Word] = []
    for item in iterate_level(api.GetIterator(), RIL.WORD):
        if item.IsAtBeginningOf(RIL.TEXTLINE) and line:
            yield line
            line = []
        try:
            text = (item.GetUTF8Text(RIL.WORD) or "").strip()
        except RuntimeError:  # an empty result has no text to return
            continue
        confidence = float(item.Confidence(RIL.WORD))
        box = item.BoundingBox(RIL.WORD)
        if not text or not any(ch.isalnum() for ch in text) or box is None:
            continue
        if confidence < MIN_WORD_CONFIDENCE:
            continue
        x1, y1, x2, y2 = (int(v) for v in box)
        line.append((text, confidence, (x1, y1, x2, y2)))
    if line:
        yield line


def find_text(source: Source, frames: Iterable[int] | None = None) -> list[TextRegion]:
    """Find burned-in text in an instance.

    Parameters
    ----------
    source
        A dataset, the bytes of a DICOM file or its path.
    frames
        Frames to read; ``None``: every frame, sampled for long cines (``sample_frames``).

    Returns
    -------
    list of TextRegion
        One per text line, in original frame pixels; text on several frames is merged.
    """
    ds = read_dataset(source)
    with bad_input():
        count = frame_count(ds)
        wanted = sample_frames(count) if frames is None else sorted(set(frames))
        for index in wanted:
            if not 0 <= index < count:
                raise NodeError("bad_frame", f'Argument "frames" must be within 0..{count - 1}.')
        found: list[TextRegion] = []
        for index in wanted:
            arr, photometric = decode(ds, index=index)
            for region in ocr_image(render_array(ds, arr, photometric, index)):
                found = _merge(found, region, index)
        return found


def _iou(a: TextRegion, b: TextRegion) -> float:
    dx = min(a.right, b.right) - max(a.left, b.left)
    dy = min(a.bottom, b.bottom) - max(a.top, b.top)
    if dx <= 0 or dy <= 0:
        return 0.0
    inter = dx * dy
    return inter / float(a.width * a.height + b.width * b.height - inter)


def _merge(found: list[TextRegion], region: TextRegion, frame: int) -> list[TextRegion]:
    for i, seen in enumerate(found):
        if frame not in seen.frames and _iou(seen, region) >= SAME_PLACE_IOU:
            left, top = min(seen.left, region.left), min(seen.top, region.top)
            right, bottom = max(seen.right, region.right), max(seen.bottom, region.bottom)
            best = seen if seen.confidence >= region.confidence else region
            found[i] = TextRegion(
                left,
                top,
                right - left,
                bottom - top,
                best.text,
                best.confidence,
                seen.frame,
                (*seen.frames, frame),
            )
            return found
    found.append(
        TextRegion(
            region.left,
            region.top,
            region.width,
            region.height,
            region.text,
            region.confidence,
            frame,
            (frame,),
        )
    )
    return found

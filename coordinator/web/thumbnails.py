"""PNG thumbnails of registered, de-identified DICOM images for the coordinator's UI.

The objects are the exam files sites shared, already de-identified and scanned
by intake; a thumbnail shows their pixels only (no header value is drawn).
Monochrome images go through ``protocols.imaging.display_image`` (Modality and
VOI LUT, as training sees them); colour images (ultrasound, RGB or palette) are
shown as stored. Only the first frame is shown.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array

from coordinator.errors import CoordinatorError
from protocols.imaging import MONOCHROME, PIXEL_ELEMENTS, ImageError, display_image

#: Largest thumbnail edge (pixels) a caller may ask for.
MAX_SIZE = 512


def _no_image(reason: str) -> CoordinatorError:
    return CoordinatorError("not_an_image", f"no thumbnail: {reason}")


def _colour(ds: pydicom.Dataset) -> npt.NDArray[np.uint8]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr: npt.NDArray[Any] = np.asarray(
            pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
        )
        if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
            arr = np.asarray(apply_color_lut(arr, ds))
    except Exception as exc:  # decoders raise many types; the reason is what matters
        raise _no_image(f"cannot decode the pixel data ({exc})") from exc
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise _no_image(f"unexpected pixel array shape {arr.shape}")
    top = float(arr.max(initial=0))
    if arr.dtype != np.uint8:
        arr = np.rint(arr.astype(np.float64) * (255.0 / max(top, 1.0)))
    clipped: npt.NDArray[np.uint8] = np.clip(arr, 0, 255).astype(np.uint8)
    return clipped


def thumbnail_png(data: bytes, size: int = 160) -> bytes:
    """A PNG of the first frame of a DICOM image, fitted into ``size`` × ``size``.

    Raises
    ------
    CoordinatorError
        ``not_an_image``: the object is not DICOM, has no pixels (a structured
        report), or its pixels cannot be decoded.
    """
    if not 16 <= size <= MAX_SIZE:
        raise CoordinatorError(
            "invalid_argument", f'Argument "size" must be from 16 to {MAX_SIZE}, not {size}.'
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise _no_image(f"not a readable DICOM object ({exc})") from exc
    if not any(name in ds for name in PIXEL_ELEMENTS):
        raise _no_image("the object has no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric in MONOCHROME and int(ds.get("SamplesPerPixel", 1) or 1) == 1:
        try:
            grey = display_image(ds, "object")
        except ImageError as exc:
            raise _no_image(exc.reason) from exc
        picture = Image.fromarray(np.rint(grey * 255.0).astype(np.uint8))
    else:
        picture = Image.fromarray(_colour(ds))
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()

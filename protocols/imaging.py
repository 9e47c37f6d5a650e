"""The DICOM pixel pipeline that training apps read radiographs through.

:func:`load_image` turns one single-channel DICOM image into a square float32
array, the same way on every node and on the coordinator (centralised
evaluation), so a model sees the same input wherever it runs:

1. the first frame is decoded (a multi-frame image contributes frame 1 only);
2. the Modality LUT is applied (the Modality LUT Sequence, or Rescale Slope and
   Intercept), giving modality values (e.g. HU, or detector units);
3. the VOI LUT is applied (the VOI LUT Sequence, or Window Center/Width with
   the VOI LUT Function), as a viewer would for display; without either the
   modality values are kept;
4. the values are scaled to [0, 1] by the image's own minimum and maximum and
   MONOCHROME1 images are inverted (``1 - x``), so that 1 is always white
   (dense) on display;
5. the image is resized to ``size`` × ``size`` with Pillow's bilinear filter
   (antialiased when shrinking; the aspect ratio is not kept: chest radiographs
   are close to square);
6. with ``standardize`` (the default) the result is standardised per image to
   zero mean and unit variance, which removes the remaining differences in
   exposure and contrast between sites; a constant image becomes all zeros.

:func:`display_image` stops after step 4, for a dataset read already (the
coordinator's thumbnails of registered images).

Anything the pipeline cannot read raises :class:`ImageError`, a ``ValueError``
naming the file and the reason.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array

#: Photometric interpretations the pipeline accepts.
MONOCHROME: Final = ("MONOCHROME1", "MONOCHROME2")
#: The pixel-data elements an image may carry its pixels in.
PIXEL_ELEMENTS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class ImageError(ValueError):
    """A file the training pipeline cannot turn into an image, and why."""

    def __init__(self, path: str | PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def load_image(
    path: str | PathLike[str], size: int, *, standardize: bool = True
) -> npt.NDArray[np.float32]:
    """Read a single-channel DICOM image as a ``size`` × ``size`` float32 array.

    Parameters
    ----------
    path
        The DICOM file.
    size
        Rows and columns of the result (a positive integer).
    standardize
        Standardise to zero mean and unit variance (the default); when false the
        result is the display image scaled to [0, 1] (1 = white).

    Raises
    ------
    ImageError
        The file is not DICOM, has no pixel data, is not monochrome, or its
        pixels cannot be decoded or transformed.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f'Argument "size" must be a positive integer, not {size!r}.')
    ds = _read(path)
    frame = _first_frame(path, ds)
    display = _display(path, ds, frame)
    resized = _resize(display, size)
    if not standardize:
        return resized
    return _standardize(resized)


def display_image(ds: Dataset, name: str = "<dataset>") -> npt.NDArray[np.float64]:
    """Steps 1-4 of the pipeline on a dataset read already: the first frame as a viewer
    shows it, scaled to [0, 1] (1 = white), in its own rows and columns.

    ``name`` names the image in an ``ImageError``.
    """
    _check_pixels(name, ds)
    return _display(name, ds, _first_frame(name, ds))


def _read(path: str | PathLike[str]) -> Dataset:
    try:
        ds = pydicom.dcmread(Path(path))
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise ImageError(path, f"not a readable DICOM file ({exc})") from exc
    _check_pixels(path, ds)
    return ds


def _check_pixels(path: str | PathLike[str], ds: Dataset) -> None:
    if not any(name in ds for name in PIXEL_ELEMENTS):
        raise ImageError(path, "the file has no pixel data")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in MONOCHROME:
        shown = photometric or "missing"
        raise ImageError(
            path,
            f"not a monochrome image (Photometric Interpretation {shown}, "
            f"{samples} samples per pixel); only MONOCHROME1 and MONOCHROME2 are supported",
        )


def _first_frame(path: str | PathLike[str], ds: Dataset) -> npt.NDArray[np.generic]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr = np.asarray(pixel_array(ds, index=0) if frames > 1 else ds.pixel_array)
    except Exception as exc:  # decoders raise many types; the reason is what matters
        raise ImageError(path, f"cannot decode the pixel data ({exc})") from exc
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.size == 0:
        raise ImageError(path, f"unexpected pixel array shape {arr.shape}")
    # Stored values stay integers: LUTs (Modality and VOI) are indexed by them.
    return arr


def _display(
    path: str | PathLike[str], ds: Dataset, frame: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    try:
        modality = np.asarray(apply_modality_lut(frame, ds))
        if modality.dtype.kind == "f" and np.array_equal(modality, np.round(modality)):
            modality = modality.astype(np.int64)  # a VOI LUT is indexed by integers too
        values = np.asarray(apply_voi_lut(modality, ds, index=0), dtype=np.float64)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ImageError(path, f"cannot apply the Modality/VOI LUT ({exc})") from exc
    if not np.all(np.isfinite(values)):
        raise ImageError(path, "the pixel values are not finite")
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if str(ds.PhotometricInterpretation).strip().upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled


def _resize(image: npt.NDArray[np.float64], size: int) -> npt.NDArray[np.float32]:
    if image.shape == (size, size):
        return image.astype(np.float32)
    picture = Image.fromarray(image.astype(np.float32))
    resized = picture.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).copy()


def _standardize(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    mean = float(image.mean())
    std = float(image.std())
    if std < 1e-6:
        return np.zeros_like(image)
    return ((image - mean) / std).astype(np.float32)

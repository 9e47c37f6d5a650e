"""Thumbnails of registered images: monochrome through the imaging pipeline, colour as
stored, and a clear refusal for objects without pixels."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from coordinator.errors import CoordinatorError
from coordinator.web.thumbnails import thumbnail_png


def _dicom(pixels: np.ndarray, photometric: str, **extra: object) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.itemsize
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_monochrome_image_is_shown_windowed_and_fitted() -> None:
    # Prepare: a 200 x 100 ramp, MONOCHROME1 (so its largest value shows black).
    ramp = np.tile(np.arange(100, dtype=np.uint16) * 40, (200, 1))

    # Execute
    png = thumbnail_png(_dicom(ramp, "MONOCHROME1"), size=64)

    # Assert
    picture = Image.open(io.BytesIO(png))
    assert picture.format == "PNG" and picture.mode == "L"
    assert picture.size == (32, 64)  # the aspect ratio is kept
    values = np.asarray(picture)
    assert values[:, 0].mean() > 240 and values[:, -1].mean() < 15
    assert not picture.info  # no text chunk: nothing but pixels


def test_a_colour_image_keeps_its_colours() -> None:
    rgb = np.zeros((40, 40, 3), dtype=np.uint8)
    rgb[..., 0] = 200

    png = thumbnail_png(_dicom(rgb, "RGB"), size=32)

    picture = Image.open(io.BytesIO(png))
    assert picture.mode == "RGB" and picture.size == (32, 32)
    assert tuple(np.asarray(picture)[16, 16]) == (200, 0, 0)


@pytest.mark.parametrize("data", [b"not dicom at all", b"\0" * 128 + b"DICM"])
def test_an_object_without_pixels_is_not_an_image(data: bytes) -> None:
    with pytest.raises(CoordinatorError) as refused:
        thumbnail_png(data)

    assert refused.value.code == "not_an_image"


def test_a_size_out_of_range_names_the_argument() -> None:
    with pytest.raises(CoordinatorError, match='"size"'):
        thumbnail_png(b"", size=4096)

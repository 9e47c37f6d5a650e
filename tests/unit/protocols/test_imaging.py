"""The training pixel pipeline: LUTs and windows, MONOCHROME1, frames, resizing, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from protocols.imaging import ImageError, display_image, load_image


def write_image(
    path: Path,
    pixels: npt.NDArray[np.integer],
    photometric: str = "MONOCHROME2",
    **elements: object,
) -> Path:
    """A minimal single-channel DICOM image (16 bits allocated, 12 stored, unsigned)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 8, columns: int = 8, top: int = 1000) -> npt.NDArray[np.int64]:
    return np.linspace(0, top, rows * columns).round().astype(np.int64).reshape(rows, columns)


def window(center: float, width: float) -> dict[str, object]:
    return {"WindowCenter": center, "WindowWidth": width, "VOILUTFunction": "LINEAR_EXACT"}


def test_rescale_is_applied_before_the_window(tmp_path: Path) -> None:
    # Prepare: stored 0..1000 -> modality -1000..1000; the window keeps [-500, 500].
    stored = ramp()
    path = write_image(
        tmp_path / "a.dcm",
        stored,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        **window(0, 1000),
    )

    # Execute
    image = load_image(path, 8, standardize=False)

    # Assert: stored 250 and 750 are the window's edges.
    modality = stored * 2.0 - 1000.0
    expected = np.clip((modality + 500.0) / 1000.0, 0.0, 1.0)
    np.testing.assert_allclose(image, expected, atol=1e-5)


def test_a_window_that_ignored_the_rescale_would_differ(tmp_path: Path) -> None:
    stored = ramp()
    rescaled = write_image(
        tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000, **window(0, 1000)
    )
    plain = write_image(tmp_path / "p.dcm", stored, **window(0, 1000))

    assert not np.allclose(load_image(rescaled, 8), load_image(plain, 8))


def test_a_voi_lut_sequence_is_applied(tmp_path: Path) -> None:
    # Prepare: a 4-entry VOI LUT that is not monotonic.
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 8]
    lut.add_new(0x00283006, "US", [0, 200, 50, 255])  # LUT Data
    stored = np.array([[0, 1], [2, 3]])
    path = write_image(tmp_path / "lut.dcm", stored, VOILUTSequence=Sequence([lut]))

    # Execute
    image = load_image(path, 2, standardize=False)

    # Assert
    np.testing.assert_allclose(image, np.array([[0, 200], [50, 255]]) / 255.0, atol=1e-6)


def test_a_modality_lut_sequence_is_applied(tmp_path: Path) -> None:
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add_new(0x00283006, "US", [100, 50, 0, 25])  # LUT Data
    lut.ModalityLUTType = "US"
    path = write_image(
        tmp_path / "mlut.dcm", np.array([[0, 1], [2, 3]]), ModalityLUTSequence=Sequence([lut])
    )

    image = load_image(path, 2, standardize=False)

    np.testing.assert_allclose(image, np.array([[1.0, 0.5], [0.0, 0.25]]), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    stored = ramp()
    two = write_image(tmp_path / "m2.dcm", stored, "MONOCHROME2")
    one = write_image(tmp_path / "m1.dcm", stored, "MONOCHROME1")

    image_two = load_image(two, 8, standardize=False)
    image_one = load_image(one, 8, standardize=False)

    np.testing.assert_allclose(image_one, 1.0 - image_two, atol=1e-6)
    assert image_one[0, 0] == pytest.approx(1.0)  # the lowest stored value is white


def test_resizing_keeps_the_picture(tmp_path: Path) -> None:
    # Prepare: a non-square image, bright on the left half.
    stored = np.zeros((60, 40), np.int64)
    stored[:, :20] = 4000
    path = write_image(tmp_path / "wide.dcm", stored)

    # Execute
    image = load_image(path, 16, standardize=False)

    # Assert
    assert image.shape == (16, 16)
    assert image.dtype == np.float32
    assert image[:, :7].min() == pytest.approx(1.0)
    assert image[:, 9:].max() == pytest.approx(0.0)
    assert 0.0 < image[0, 8] < 1.0  # bilinear at the edge


def test_standardised_images_have_zero_mean_and_unit_variance(tmp_path: Path) -> None:
    varied = write_image(tmp_path / "v.dcm", ramp(16, 16, 4000))
    flat = write_image(tmp_path / "f.dcm", np.full((16, 16), 7))

    image = load_image(varied, 16)

    assert float(image.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(image.std()) == pytest.approx(1.0, abs=1e-4)
    assert not load_image(flat, 16).any()


def test_only_the_first_frame_of_a_multi_frame_image_is_used(tmp_path: Path) -> None:
    frames = np.stack([ramp(), ramp()[::-1], np.zeros((8, 8), np.int64)])
    path = write_image(tmp_path / "mf.dcm", frames)
    single = write_image(tmp_path / "sf.dcm", frames[0])

    np.testing.assert_allclose(load_image(path, 8), load_image(single, 8))


def test_a_file_without_pixels_is_refused_with_its_path(tmp_path: Path) -> None:
    ds = dcmread(write_image(tmp_path / "empty.dcm", ramp()))
    del ds.PixelData
    path = tmp_path / "no-pixels.dcm"
    ds.save_as(path, enforce_file_format=True)

    with pytest.raises(ImageError, match="no pixel data") as caught:
        load_image(path, 8)

    assert caught.value.path == str(path)
    assert isinstance(caught.value, ValueError)


def test_a_colour_image_is_refused(tmp_path: Path) -> None:
    path = write_image(tmp_path / "rgb.dcm", ramp(), "PALETTE COLOR")

    with pytest.raises(ImageError, match="not a monochrome image"):
        load_image(path, 8)


def test_a_file_that_is_not_dicom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not an image")

    with pytest.raises(ImageError, match="not a readable DICOM file") as caught:
        load_image(path, 8)
    assert caught.value.path == str(path)
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.dcm", 8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_a_bad_size_names_the_argument(tmp_path: Path, size: object) -> None:
    path = write_image(tmp_path / "a.dcm", ramp())

    with pytest.raises(ValueError, match='"size"'):
        load_image(path, size)  # type: ignore[arg-type]


def test_display_image_is_the_pipeline_before_resizing(tmp_path: Path) -> None:
    # Prepare: a square image (load_image keeps its size) and a wide one, rescaled and windowed.
    elements = {"RescaleSlope": 2, "RescaleIntercept": -1000, **window(0, 1000)}
    square = write_image(tmp_path / "a.dcm", ramp(8, 8), **elements)
    wide = write_image(tmp_path / "b.dcm", ramp(8, 12), **elements)

    # Execute
    shown = display_image(dcmread(square))
    loaded = load_image(square, 8, standardize=False)
    wide_shown = display_image(dcmread(wide))

    # Assert
    assert np.allclose(shown, loaded)
    assert wide_shown.shape == (8, 12) and wide_shown.min() == 0.0 and wide_shown.max() == 1.0
    with pytest.raises(ImageError, match="monochrome"):
        display_image(dcmread(write_image(tmp_path / "c.dcm", ramp(), "RGB")), "c")

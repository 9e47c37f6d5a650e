"""Burned-in text: rendering, OCR of planted text, masking by OCR box and by device rule.

Every image is generated here: an ultrasound-like RGB frame (speckled sector,
text in the black margin), a 16-bit CT-like MONOCHROME2 image and a 3-frame
cine, each with a patient name and an ID drawn with Pillow's built-in font.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)

from node.errors import NodeError
from node.vetting import masking, ocr
from node.vetting.masking import MaskResult, Rect
from node.vetting.ocr import TextRegion

US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_CLASS = "1.2.840.10008.5.1.4.1.1.3.1"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"
NAME = "DOE JANE"
PATIENT_ID = "ID 48213579"
FONT = ImageFont.load_default(size=28)


@dataclass
class Planted:
    """A generated image and where its text went (ink: every pixel the text changed)."""

    arr: npt.NDArray[np.generic]
    ink: dict[str, npt.NDArray[np.bool_]]

    def box(self, text: str) -> tuple[int, int, int, int]:
        rows, cols = np.nonzero(self.ink[text])
        return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1

    def all_ink(self) -> npt.NDArray[np.bool_]:
        return np.logical_or.reduce(list(self.ink.values()))


def norm(text: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", text.upper())


def alpha(shape: tuple[int, int], xy: tuple[int, int], text: str) -> npt.NDArray[np.float64]:
    layer = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(layer).text(xy, text, fill=255, font=FONT)
    return np.asarray(layer, dtype=np.float64) / 255.0


def speckle(shape: tuple[int, int], seed: int) -> npt.NDArray[np.float64]:
    """Smooth speckle in a fan-shaped sector, black elsewhere (values 0..255)."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    noise = rng.gamma(2.0, 40.0, shape).clip(0, 255).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(noise).filter(ImageFilter.GaussianBlur(1.5)), float)
    yy, xx = np.mgrid[0:rows, 0:cols]
    radius = np.hypot(xx - cols / 2, yy - 60)
    angle = np.arctan2(xx - cols / 2, yy - 60)
    sector = (radius > 40) & (radius < rows - 90) & (np.abs(angle) < 0.6)
    return np.where(sector, smooth, 0.0)


def ultrasound(seed: int = 1, texts: bool = True) -> Planted:
    """A 480x640 RGB frame: grey speckle sector, white name and yellow ID in the margins."""
    shape = (480, 640)
    grey = speckle(shape, seed)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    ink = {}
    if texts:
        for text, xy, colour in (
            (NAME, (12, 10), (255, 255, 255)),
            (PATIENT_ID, (12, 436), (255, 220, 0)),
        ):
            a = alpha(shape, xy, text)[..., None]
            rgb = rgb * (1 - a) + np.array(colour, float) * a
            ink[text] = a[..., 0] > 0
    return Planted(np.rint(rgb).astype(np.uint8), ink)


def ct_like() -> Planted:
    """A 512x512 12-bit CT-like slice (air 0, body ~1064), text at the maximum value 4095."""
    shape = (512, 512)
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:512, 0:512]
    values = np.zeros(shape)
    values[((xx - 256) / 200) ** 2 + ((yy - 270) / 150) ** 2 < 1] = 1064
    values[(xx - 200) ** 2 + (yy - 260) ** 2 < 30**2] = 1300
    values += np.where(values > 0, rng.normal(0, 10, shape), 0)
    ink = {}
    for text, xy in ((NAME, (14, 12)), (PATIENT_ID, (14, 466))):
        a = alpha(shape, xy, text)
        values = values * (1 - a) + 4095 * a
        ink[text] = a > 0
    return Planted(np.rint(values.clip(0, 4095)).astype(np.uint16), ink)


def cine(frames: int = 3) -> Planted:
    """An 8-bit MONOCHROME2 cine: new speckle on every frame, the same text on all."""
    shape = (480, 640)
    stack = []
    ink: dict[str, npt.NDArray[np.bool_]] = {}
    for index in range(frames):
        values = speckle(shape, seed=10 + index)
        for text, xy in ((NAME, (12, 10)), (PATIENT_ID, (400, 436))):
            a = alpha(shape, xy, text)
            values = values * (1 - a) + 250 * a
            ink[text] = a > 0
        stack.append(np.rint(values).astype(np.uint8))
    return Planted(np.stack(stack), ink)


def dataset(
    arr: npt.NDArray[np.generic],
    *,
    photometric: str,
    bits_stored: int,
    sop_class: str = US_CLASS,
    modality: str = "US",
    frames: int = 1,
    **attrs: object,
) -> Dataset:
    """A de-identified-looking instance holding ``arr`` natively (Explicit VR Little Endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.1001"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "2.25.1001"
    ds.StudyInstanceUID = "2.25.1002"
    ds.SeriesInstanceUID = "2.25.1003"
    ds.Modality = modality
    ds.PatientName = "PSEUDONYM"
    ds.PatientID = "PSEUDONYM"
    ds.Manufacturer = "ACME Imaging"
    ds.ManufacturerModelName = "EchoStar 9"
    ds.BurnedInAnnotation = "YES"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "RADFED TEST PROFILE"
    basic = Dataset()
    basic.CodeValue = "113100"
    basic.CodingSchemeDesignator = "DCM"
    basic.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = Sequence([basic])
    samples = 3 if photometric in ("RGB", "YBR_FULL_422") else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = arr.shape[-3:-1] if samples > 1 else arr.shape[-2:]
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    return ds


def write(ds: Dataset, path: Path, *, implicit: bool = False) -> Path:
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def us_dataset(planted: Planted) -> Dataset:
    return dataset(planted.arr, photometric="RGB", bits_stored=8)


def ct_dataset(planted: Planted) -> Dataset:
    return dataset(
        planted.arr,
        photometric="MONOCHROME2",
        bits_stored=12,
        sop_class=CT_CLASS,
        modality="CT",
        RescaleIntercept=-1024,
        RescaleSlope=1,
        WindowCenter=40,
        WindowWidth=400,
    )


def region_for(regions: list[TextRegion], text: str) -> TextRegion:
    matches = [r for r in regions if norm(text) in norm(r.text)]
    assert matches, f"{text!r} not found in {[r.text for r in regions]}"
    return matches[0]


def covers(region: TextRegion, box: tuple[int, int, int, int], slack: int = 2) -> bool:
    left, top, right, bottom = box
    return (
        region.left <= left + slack
        and region.top <= top + slack
        and region.right >= right - slack
        and region.bottom >= bottom - slack
    )


def ink_rects(planted: Planted, *texts: str, margin: int = 2) -> list[Rect]:
    rects = []
    for text in texts:
        left, top, right, bottom = planted.box(text)
        rects.append(
            Rect(
                max(0, left - margin),
                max(0, top - margin),
                right - left + 2 * margin,
                bottom - top + 2 * margin,
            )
        )
    return rects


def untouched(shape: tuple[int, ...], rects: tuple[Rect, ...]) -> npt.NDArray[np.bool_]:
    outside = np.ones(shape, bool)
    for rect in rects:
        outside[rect.top : rect.bottom, rect.left : rect.right] = False
    return outside


def assert_masked_file(path: Path, result: MaskResult) -> Dataset:
    """The masked file reads back, uncompressed, with the masking recorded."""
    out = pydicom.dcmread(path)
    assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert result.transfer_syntax_out == ExplicitVRLittleEndian
    assert out.SOPInstanceUID == "2.25.1001"
    assert out.file_meta.MediaStorageSOPInstanceUID == "2.25.1001"
    codes = [
        (i.CodeValue, i.CodingSchemeDesignator) for i in out.DeidentificationMethodCodeSequence
    ]
    assert ("113100", "DCM") in codes and ("113101", "DCM") in codes
    assert "CLEAN PIXEL DATA" in list(out.DeidentificationMethod)
    assert out.pixel_array is not None
    return out


US = ultrasound()
CT = ct_like()


@pytest.fixture(scope="module")
def us_regions() -> list[TextRegion]:
    return ocr.find_text(us_dataset(US))


@pytest.fixture(scope="module")
def ct_regions(tmp_path_factory: pytest.TempPathFactory) -> list[TextRegion]:
    path = write(ct_dataset(CT), tmp_path_factory.mktemp("ct") / "ct.dcm", implicit=True)
    return ocr.find_text(path)


# ------------------------------------------------------------------------------------------
# Finding text


@pytest.mark.parametrize("kind", ["ultrasound", "ct"])
def test_find_text_finds_the_planted_name_and_id(
    kind: str, us_regions: list[TextRegion], ct_regions: list[TextRegion]
) -> None:
    # Prepare
    planted, regions = (US, us_regions) if kind == "ultrasound" else (CT, ct_regions)

    # Execute
    found = {text: region_for(regions, text) for text in (NAME, PATIENT_ID)}

    # Assert
    for text, region in found.items():
        assert covers(region, planted.box(text)), (text, region, planted.box(text))
        assert region.frame == 0 and region.frames == (0,)
        assert region.confidence >= 60
    assert len(regions) == 2


def test_find_text_reads_bytes_and_gives_nothing_for_an_image_without_text() -> None:
    # Prepare
    buffer = io.BytesIO()
    us_dataset(ultrasound(seed=3, texts=False)).save_as(buffer, enforce_file_format=True)

    # Execute
    regions = ocr.find_text(buffer.getvalue())

    # Assert
    assert regions == []


# ------------------------------------------------------------------------------------------
# Masking


@pytest.mark.parametrize("kind", ["ultrasound", "ct"])
def test_masking_the_found_text_gives_a_clean_instance(
    kind: str, tmp_path: Path, us_regions: list[TextRegion], ct_regions: list[TextRegion]
) -> None:
    # Prepare
    if kind == "ultrasound":
        planted, regions, ds = US, us_regions, us_dataset(US)
    else:
        planted, regions, ds = CT, ct_regions, ct_dataset(CT)
    source = write(ds, tmp_path / "in.dcm", implicit=kind == "ct")
    target = tmp_path / "out.dcm"

    # Execute
    result = masking.mask_instance(source, target, masking.rects_for_regions(regions))

    # Assert
    assert result.clean and result.rechecked and result.remaining == ()
    assert result.frames_masked == 1
    out = assert_masked_file(target, result)
    assert out.BurnedInAnnotation == "NO"
    pixels = out.pixel_array
    darkest = planted.arr.min(axis=(0, 1)) if pixels.ndim == 3 else planted.arr.min()
    assert (pixels[planted.all_ink()] == darkest).all()
    outside = untouched(pixels.shape[:2], result.rectangles)
    assert (pixels[outside] == planted.arr[outside]).all()
    assert ocr.find_text(target) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.dcm", "out.dcm"]


def test_an_incomplete_mask_is_not_clean_and_keeps_burned_in_yes(
    tmp_path: Path, ct_regions: list[TextRegion]
) -> None:
    # Prepare
    source = write(ct_dataset(CT), tmp_path / "ct.dcm")
    only_name = masking.rects_for_regions([region_for(ct_regions, NAME)])

    # Execute
    result = masking.mask_instance(source, source, only_name)

    # Assert
    assert not result.clean
    assert [norm(r.text) for r in result.remaining] == [norm(PATIENT_ID)]
    out = assert_masked_file(source, result)
    assert out.BurnedInAnnotation == "YES"
    assert (out.pixel_array[CT.ink[NAME]] == 0).all()


def encode_jpeg_baseline(planted: Planted) -> Dataset:
    """JPEG baseline, 4:2:2 YCbCr as Pillow writes it: YBR_FULL_422."""
    buffer = io.BytesIO()
    Image.fromarray(planted.arr).save(buffer, format="JPEG", quality=95, subsampling=1)
    ds = us_dataset(planted)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def encode_rle(planted: Planted) -> Dataset:
    ds = us_dataset(planted)
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def encode_big_endian(planted: Planted) -> Dataset:
    """Explicit VR Big Endian (retired, still sent by old modalities)."""
    ds = ct_dataset(planted)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = planted.arr.astype(">u2").tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def encode_j2k(planted: Planted) -> Dataset:
    ds = ct_dataset(planted)
    ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    return ds


@pytest.mark.parametrize(
    ("encode", "syntax", "photometric"),
    [
        (encode_rle, RLELossless, "RGB"),
        (encode_jpeg_baseline, JPEGBaseline8Bit, "RGB"),
        (encode_j2k, JPEG2000Lossless, "MONOCHROME2"),
        (encode_big_endian, ExplicitVRBigEndian, "MONOCHROME2"),
    ],
    ids=["rle", "jpeg-baseline", "jpeg2000", "big-endian"],
)
def test_encoded_inputs_are_masked_and_written_uncompressed_little_endian(
    tmp_path: Path, encode: Callable[[Planted], Dataset], syntax: UID, photometric: str
) -> None:
    # Prepare
    planted = CT if photometric == "MONOCHROME2" else US
    source = write(encode(planted), tmp_path / "in.dcm")
    assert pydicom.dcmread(source).file_meta.TransferSyntaxUID == syntax

    # Execute
    result = masking.mask_instance(
        source, tmp_path / "out.dcm", ink_rects(planted, NAME, PATIENT_ID)
    )

    # Assert
    assert result.transfer_syntax_in == syntax
    assert result.clean
    out = assert_masked_file(tmp_path / "out.dcm", result)
    assert out.PhotometricInterpretation == photometric
    assert "NumberOfFrames" not in out
    pixel_vr = out["PixelData"].VR
    assert pixel_vr == ("OW" if planted is CT else "OB")
    assert not out["PixelData"].is_undefined_length
    pixels = out.pixel_array
    if photometric == "RGB":
        assert out.PlanarConfiguration == 0 and pixels.shape == (480, 640, 3)
    darkest = pixels.min(axis=(0, 1)) if pixels.ndim == 3 else pixels.min()
    assert (pixels[planted.all_ink()] == darkest).all()
    if syntax == JPEGBaseline8Bit:
        assert out.LossyImageCompression == "01"
        assert out.LossyImageCompressionMethod == "ISO_10918_1"
    else:
        assert "LossyImageCompression" not in out
        outside = untouched(pixels.shape[:2], result.rectangles)
        assert (pixels[outside] == planted.arr[outside]).all()


def test_a_cine_is_masked_on_every_frame(tmp_path: Path) -> None:
    # Prepare
    planted = cine(frames=3)
    ds = dataset(
        planted.arr,
        photometric="MONOCHROME2",
        bits_stored=8,
        sop_class=US_MULTIFRAME_CLASS,
        frames=3,
    )
    source = write(ds, tmp_path / "cine.dcm")
    regions = ocr.find_text(source)

    # Execute
    result = masking.mask_instance(source, tmp_path / "out.dcm", masking.rects_for_regions(regions))

    # Assert
    assert {norm(r.text) for r in regions} == {norm(NAME), norm(PATIENT_ID)}
    assert all(r.frames == (0, 1, 2) for r in regions)
    assert result.frames_masked == 3 and result.clean
    out = assert_masked_file(tmp_path / "out.dcm", result)
    assert out.NumberOfFrames == 3
    pixels = out.pixel_array
    for index in range(3):
        assert (pixels[index][planted.all_ink()] == planted.arr.min()).all()


def test_sampling_a_long_cine_keeps_first_and_last_frames() -> None:
    # Execute
    short, long = ocr.sample_frames(5), ocr.sample_frames(300)

    # Assert
    assert short == [0, 1, 2, 3, 4]
    assert long[0] == 0 and long[-1] == 299
    assert len(long) <= ocr.MAX_OCR_FRAMES + 1
    assert max(b - a for a, b in itertools.pairwise(long)) <= 10


# ------------------------------------------------------------------------------------------
# Device rules


def header(manufacturer: str, model: str, rows: int, columns: int, modality: str = "US") -> Dataset:
    ds = Dataset()
    ds.Manufacturer, ds.ManufacturerModelName, ds.Modality = manufacturer, model, modality
    ds.Rows, ds.Columns = rows, columns
    return ds


def test_packaged_rules_match_their_device_and_size_only() -> None:
    # Prepare
    rules = masking.load_rules()

    # Execute
    s2000 = masking.rules_for(header("SIEMENS", "ACUSON S2000", 768, 1024), rules)
    other_size = masking.rules_for(header("SIEMENS", "ACUSON S2000", 600, 800), rules)
    other_maker = masking.rules_for(header("GE Healthcare", "ACUSON S2000", 768, 1024), rules)
    aplio = masking.rules_for(header("TOSHIBA_MEC_US", "TUS-A500", 720, 960), rules)

    # Assert
    assert s2000 == [Rect(0, 0, 1024, 60)]
    assert other_size == [] and other_maker == []
    assert aplio == [Rect(0, 0, 960, 60)]


def test_a_site_rule_masks_its_layout(tmp_path: Path) -> None:
    # Prepare
    rules_file = tmp_path / "site_rules.json"
    rules_file.write_text(
        json.dumps(
            {
                "format": "radfed-mask-rules",
                "version": 1,
                "rules": [
                    {
                        "name": "ACME EchoStar header and footer",
                        "manufacturer": "acme",
                        "model": "ECHOSTAR9",
                        "modality": "US",
                        "rows": 480,
                        "columns": 640,
                        "rectangles": [[0, 0, 640, 50], [0, 425, 300, 55]],
                    }
                ],
            }
        )
    )
    rules = masking.load_rules(rules_file)
    source = write(us_dataset(US), tmp_path / "us.dcm")

    # Execute
    rects = masking.rules_for(pydicom.dcmread(source, stop_before_pixels=True), rules)
    elsewhere = masking.rules_for(header("ACME Imaging", "EchoStar 9", 600, 800), rules)
    result = masking.mask_instance(source, tmp_path / "out.dcm", rects)

    # Assert
    assert rects == [Rect(0, 0, 640, 50), Rect(0, 425, 300, 55)]
    assert elsewhere == []
    assert len(rules) > len(masking.load_rules())
    assert result.clean
    assert pydicom.dcmread(tmp_path / "out.dcm").BurnedInAnnotation == "NO"


def test_bad_rules_and_rectangles_are_refused_naming_what_is_wrong(tmp_path: Path) -> None:
    # Prepare
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "format": "radfed-mask-rules",
                "version": 1,
                "rules": [
                    {
                        "name": "x",
                        "manufacturer": "ACME",
                        "rows": 10,
                        "columns": 10,
                        "rectangles": [[5, 5, 10, 10]],
                    }
                ],
            }
        )
    )
    source = write(us_dataset(US), tmp_path / "us.dcm")

    # Execute
    with pytest.raises(NodeError) as rules_error:
        masking.load_rules(bad)
    with pytest.raises(NodeError) as rect_error:
        Rect(0, 0, 0, 5)
    with pytest.raises(NodeError) as outside_error:
        masking.mask_instance(source, tmp_path / "out.dcm", [Rect(700, 0, 10, 10)])
    with pytest.raises(NodeError) as frame_error:
        ocr.render(source, frame=1)

    # Assert
    assert rules_error.value.code == "bad_mask_rules" and "rules.0" in rules_error.value.message
    assert '"rectangles"' in rect_error.value.message
    assert '"rectangles"' in outside_error.value.message
    assert not (tmp_path / "out.dcm").exists()
    assert '"frame"' in frame_error.value.message


# ------------------------------------------------------------------------------------------
# Rendering


def test_monochrome1_windowing_and_rescale_render_dark_and_light() -> None:
    # Prepare: left half stored 100, right half stored 3000
    arr = np.full((64, 64), 100, np.uint16)
    arr[:, 32:] = 3000
    mono2 = dataset(arr, photometric="MONOCHROME2", bits_stored=12, modality="CR")
    mono1 = dataset(arr, photometric="MONOCHROME1", bits_stored=12, modality="CR")
    windowed = dataset(
        arr,
        photometric="MONOCHROME2",
        bits_stored=12,
        modality="CT",
        WindowCenter=[100, 2000],
        WindowWidth=[50, 4000],
    )
    ct = dataset(
        np.array([[0, 1024 + 40, 1024 + 240, 4095]], np.uint16),
        photometric="MONOCHROME2",
        bits_stored=12,
        modality="CT",
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
    )

    # Execute
    m2, m1, w, hu = ocr.render(mono2), ocr.render(mono1), ocr.render(windowed), ocr.render(ct)

    # Assert
    assert m2.dtype == np.uint8 and m2.shape == (64, 64)
    assert (m2[:, :32] == 0).all() and (m2[:, 32:] == 255).all()
    assert (m1[:, :32] == 255).all() and (m1[:, 32:] == 0).all()
    assert 120 <= w[0, 0] <= 135 and w[0, 40] == 255  # first window pair: centre 100
    assert hu[0].tolist()[0] == 0 and 125 <= hu[0, 1] <= 130 and hu[0, 2] == 255 == hu[0, 3]


def test_thumbnail_is_a_small_png_of_the_rendered_frame() -> None:
    # Execute
    png = ocr.thumbnail_png(ct_dataset(CT), size=128)

    # Assert
    image = Image.open(io.BytesIO(png))
    assert png.startswith(b"\x89PNG") and image.size == (128, 128) and image.mode == "L"
    assert np.asarray(image)[2:12, 5:60].max() > 200  # the name's white strokes survive

"""The engine on single files: what each rule does to an element, in every encoding."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.deid.dicomio import DicomFormatError
from node.deid.engine import IMPLEMENTATION_CLASS_UID, Deidentifier, DeidResult
from node.deid.values import Keyed
from protocols.deid.options import DeidOptions
from protocols.deid.profile import compile_profile

SECRET = b"k" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"


def engine(*settings: str, basic: bool = False) -> Deidentifier:
    options = DeidOptions.basic() if basic else DeidOptions()
    return Deidentifier(compile_profile(options.with_settings(settings)), Keyed(SECRET, "SITE"))


def ct(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.3.4.5.6.1"
    ds.StudyInstanceUID = "1.2.3.4.5.6.2"
    ds.SeriesInstanceUID = "1.2.3.4.5.6.3"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN0042"
    ds.PatientAge = "044Y"
    ds.StudyDate = "20200315"
    ds.Modality = "CT"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian, **meta: object) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    for keyword, value in meta.items():
        setattr(ds.file_meta, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def output(result: DeidResult) -> bytes:
    return b"".join(bytes(c) for c in result.chunks)


def read(result: DeidResult) -> Dataset:
    return pydicom.dcmread(io.BytesIO(output(result)))


def test_identity_is_replaced_and_characteristics_kept() -> None:
    result = engine().deidentify(encode(ct()))
    out = read(result)

    assert out.PatientID == result.pseudonym and str(out.PatientName) == result.pseudonym
    assert out.PatientAge == "044Y"
    assert out.StudyDate != "20200315" and len(out.StudyDate) == 8
    assert out.SOPInstanceUID.startswith("2.25.") and out.SOPInstanceUID == result.sop_instance_uid
    assert b"DOE" not in output(result) and b"MRN0042" not in output(result)
    assert result.relpath == (
        f"{result.pseudonym}/{out.StudyInstanceUID}/{out.SeriesInstanceUID}/"
        f"{out.SOPInstanceUID}.dcm"
    )


def test_unknown_public_attributes_are_denied_at_every_depth() -> None:
    ds = ct()
    ds.add(DataElement(0x00189073, "FD", 1.5))  # Acquisition Duration: not kept
    ds.add(DataElement(0x0018FFF0, "LO", "CANARY-UNKNOWN"))  # not in any dictionary
    region = Dataset()
    region.CodeValue = "51185008"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Chest"
    region.add(DataElement(0x0018FFF0, "LO", "CANARY-NESTED"))
    region.PatientName = "NESTED^NAME"
    ds.AnatomicRegionSequence = Sequence([region])

    out = read(engine().deidentify(encode(ds)))

    assert 0x00189073 not in out and 0x0018FFF0 not in out
    item = out.AnatomicRegionSequence[0]
    assert item.CodeValue == "51185008" and 0x0018FFF0 not in item
    assert item.PatientName == ""  # nested PN: Z, never the pseudonym


def test_private_elements_are_removed_unless_safe_and_retained() -> None:
    ds = ct()
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", "1000")
    ds.private_block(0x0043, "GEMS_PARM_01").add_new(0x40, "LO", "CANARY-PRIVATE")
    ds.private_block(0x0009, "GEMS_IDEN_01", create=True).add_new(0x01, "LO", "CANARY-NAME")
    data = encode(ds)

    default_out = output(engine().deidentify(data))
    safe = read(engine("retain-safe-private").deidentify(data))

    assert b"GEMS" not in default_out
    assert 0x00431039 not in pydicom.dcmread(io.BytesIO(default_out))
    block = safe.private_block(0x0043, "GEMS_PARM_01")
    assert block[0x39].value == 1000
    assert (0x0043, 0x1040) not in safe and 0x00091001 not in safe and 0x00090010 not in safe


def test_safe_private_in_implicit_vr_needs_a_plausible_value() -> None:
    ds = ct()
    ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", "1000")
    good = encode(ds, ImplicitVRLittleEndian)
    del ds[0x00431039]
    ds.private_block(0x0043, "GEMS_PARM_01").add_new(0x39, "LO", "NAME")
    bad = encode(ds, ImplicitVRLittleEndian)

    assert 0x00431039 in read(engine("retain-safe-private").deidentify(good))
    assert b"NAME" not in output(engine("retain-safe-private").deidentify(bad))


def test_file_meta_is_rebuilt() -> None:
    data = encode(
        ct(),
        SourceApplicationEntityTitle="CANARYAE",
        PrivateInformationCreatorUID="1.2.9.9",
        PrivateInformation=b"CANARYPRIV",
    )

    result = engine().deidentify(data)
    out = read(result)

    assert out.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID.decode()
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in out.file_meta
    assert b"CANARY" not in output(result) and b"1.2.9.9" not in output(result)
    assert output(result)[:128] == bytes(128)


def test_method_attributes_follow_the_options() -> None:
    out = read(engine("retain-device-identity", "clean-descriptors").deidentify(encode(ct())))

    codes = [item.CodeValue for item in out.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113105", "113107", "113108", "113109"]
    assert out.PatientIdentityRemoved == "YES"
    assert out.LongitudinalTemporalInformationModified == "MODIFIED"
    assert "RETAIN DEVICE IDENTITY" in out.DeidentificationMethod


def test_input_method_attributes_are_never_copied() -> None:
    ds = ct(PatientIdentityRemoved="NO", DeidentificationMethod="CANARY-METHOD")

    out = read(engine(basic=True).deidentify(encode(ds)))

    assert out.PatientIdentityRemoved == "YES"
    assert "CANARY-METHOD" not in out.DeidentificationMethod
    assert out.LongitudinalTemporalInformationModified == "REMOVED"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_uid_references_map_consistently_in_any_encoding(syntax: str) -> None:
    ds = ct(FrameOfReferenceUID="1.2.3.4.5.6.9")
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = "1.2.3.4.5.6.1"
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4.5.6.1"
    ref.ReferencedImageSequence = Sequence([inner])
    ds.SourceImageSequence = Sequence([ref])

    result = engine().deidentify(encode(ds, syntax))
    out = read(result)

    assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.SourceImageSequence[0].ReferencedSOPClassUID == CT  # a class UID stays
    nested = out.SourceImageSequence[0].ReferencedImageSequence[0]
    assert nested.ReferencedSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == syntax
    assert b"1.2.3.4.5.6" not in output(result)


def test_retain_uids_keeps_them() -> None:
    out = read(engine("retain-uids").deidentify(encode(ct())))

    assert out.SOPInstanceUID == "1.2.3.4.5.6.1" and out.StudyInstanceUID == "1.2.3.4.5.6.2"


def test_device_identity_is_removed_unless_retained() -> None:
    data = encode(ct(DeviceSerialNumber="SN-CANARY", StationName="CT-CANARY"))

    removed = read(engine().deidentify(data))
    kept = read(engine("retain-device-identity").deidentify(data))

    assert "DeviceSerialNumber" not in removed and "StationName" not in removed
    assert kept.DeviceSerialNumber == "SN-CANARY" and kept.StationName == "CT-CANARY"


def test_full_dates_keep_dates() -> None:
    out = read(engine("retain-longitudinal-full-dates").deidentify(encode(ct())))

    assert out.StudyDate == "20200315"
    assert out.LongitudinalTemporalInformationModified == "UNMODIFIED"


def test_an_unparseable_date_is_emptied_and_noted() -> None:
    result = engine().deidentify(encode(ct(StudyDate="15/03/2020")))

    assert read(result).StudyDate == ""
    assert any("unparseable date" in note for note in result.notes)
    assert b"15/03/2020" not in output(result)


def test_overlays_go_unless_clean_graphics_keeps_them_and_flags_the_image() -> None:
    ds = ct()
    ds.add_new(0x60000010, "US", 2)
    ds.add_new(0x60000011, "US", 2)
    ds.add_new(0x60000022, "LO", "CANARY-OVERLAY")
    ds.add_new(0x60003000, "OW", b"\x0f\x00")
    data = encode(ds)

    gone = engine().deidentify(data)
    kept = engine("clean-graphics").deidentify(data)

    assert 0x60003000 not in read(gone) and not gone.risk
    out = read(kept)
    assert out[0x60003000].value == b"\x0f\x00" and 0x60000022 not in out
    assert any("overlay" in reason for reason in kept.risk)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"Modality": "US"}, "ultrasound without BurnedInAnnotation"),
        ({"BurnedInAnnotation": "YES"}, "BurnedInAnnotation is YES"),
        ({"ImageType": ["DERIVED", "SECONDARY"]}, "ImageType SECONDARY"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary capture"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "encapsulated document"),
    ],
)
def test_burned_in_risk_is_flagged(extra: dict[str, object], reason: str) -> None:
    result = engine().deidentify(encode(ct(**extra)))

    assert any(reason in r for r in result.risk), result.risk


def test_a_ct_that_says_no_burned_in_annotation_is_not_flagged() -> None:
    assert engine().deidentify(encode(ct(BurnedInAnnotation="NO"))).risk == []


def test_un_encoded_public_attributes_follow_their_real_vr() -> None:
    saved = pydicom.config.replace_un_with_known_vr
    pydicom.config.replace_un_with_known_vr = False
    try:
        ds = ct()
        del ds.StudyDate
        ds.add(DataElement(0x00080020, "UN", b"20200315"))  # Study Date written as UN
        ds.add(DataElement(0x00100030, "UN", b"19500101"))  # Birth Date as UN
        name = b"UN^CANARY "
        item = b"\x10\x00\x10\x00" + len(name).to_bytes(4, "little") + name
        ds.add(
            DataElement(
                0x00400275, "UN", b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item
            )
        )
        data = encode(ds)
    finally:
        pydicom.config.replace_un_with_known_vr = saved

    result = engine().deidentify(data)
    raw = output(result)

    assert b"20200315" not in raw and b"19500101" not in raw and b"CANARY" not in raw
    assert len(read(result).StudyDate) == 8  # shifted, not lost


@pytest.mark.parametrize(
    "name",
    [
        "JPEG2000.dcm",
        "MR_small_bigendian.dcm",
        "image_dfl.dcm",
        "SC_rgb_rle.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg_gdcm.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_pixel_data_leaves_byte_identical(name: str) -> None:
    path = get_testdata_file(name)
    original = pydicom.dcmread(path)

    out = read(engine().deidentify(Path(path).read_bytes()))

    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert out.PixelData == original.PixelData


def test_undefined_length_sequences_keep_their_form() -> None:
    path = get_testdata_file("JPEG2000.dcm")  # pixel data is undefined length
    data = Path(path).read_bytes()

    raw = output(engine().deidentify(data))

    start = raw.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
    assert raw[start:] == data[data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") :]


def test_deflated_files_are_rewritten_deflated() -> None:
    path = get_testdata_file("image_dfl.dcm")

    raw = output(engine().deidentify(Path(path).read_bytes()))

    out = pydicom.dcmread(io.BytesIO(raw))
    assert out.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    assert b"PatientIdentityRemoved" not in raw and len(zlib.decompress(raw[meta_end:], -15)) > 0


def test_a_bare_data_set_without_meta_gets_one() -> None:
    ds = ct()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)

    out = read(engine().deidentify(buffer.getvalue()))

    assert out.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


@pytest.mark.parametrize(
    ("data", "code", "message"),
    [
        (b"hello, this is not DICOM at all", "not_dicom", "no recognisable data set"),
        (b"", "not_dicom", "too short"),
    ],
)
def test_non_dicom_is_refused(data: bytes, code: str, message: str) -> None:
    with pytest.raises(DicomFormatError, match=message) as info:
        engine().deidentify(data)
    assert info.value.code == code


def test_a_truncated_file_is_refused() -> None:
    data = encode(ct())

    with pytest.raises(DicomFormatError) as info:
        engine().deidentify(data[:-3])

    assert info.value.code == "truncated"


def test_a_missing_sop_instance_uid_is_refused() -> None:
    ds = ct()
    data = encode(ds)
    del ds.SOPInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)

    with pytest.raises(DicomFormatError, match="missing SOP Instance UID"):
        engine().deidentify(buffer.getvalue())
    assert engine().deidentify(data)  # the same file with it goes through


def test_absurd_nesting_is_refused_not_crashed() -> None:
    ds = ct()
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(80):
        outer = Dataset()
        outer.ConceptNameCodeSequence = Sequence([inner])
        inner = outer
    ds.ConceptNameCodeSequence = Sequence([inner])

    with pytest.raises(DicomFormatError, match="nested deeper"):
        engine().deidentify(encode(ds))


def test_same_input_same_bytes() -> None:
    data = encode(ct())

    assert output(engine().deidentify(data)) == output(engine().deidentify(data))


def test_retained_uids_cannot_name_files_outside_the_tree() -> None:
    data = encode(ct(SOPInstanceUID="../../etc/passwd"))

    with pytest.raises(DicomFormatError, match="SOP Instance UID is not a valid UID"):
        engine("retain-uids").deidentify(data)
    assert ".." not in engine().deidentify(data).relpath  # mapped UIDs are always valid


def test_a_kept_attribute_smuggling_items_is_removed() -> None:
    # Pixel Aspect Ratio (kept) written as UN of undefined length holding an item
    # with a patient name: a raw copy would leak it.
    data = encode(ct())
    name = b"LEAK^NAME "
    item = b"\x10\x00\x10\x00" + len(name).to_bytes(4, "little") + name
    smuggled = (
        b"\x28\x00\x34\x00UN\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + item
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    at = data.index(b"\xe0\x7f\x10\x00")
    result = engine().deidentify(data[:at] + smuggled + data[at:])

    assert b"LEAK" not in output(result)
    assert any("undefined length" in note for note in result.notes)

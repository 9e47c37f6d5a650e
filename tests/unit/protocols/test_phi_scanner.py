"""The PHI scanner on single instances: each finding kind, where it points, how bad it is.

Every test starts from a real engine output (the engine is the de-identifier the
scanner checks, not a stand-in), plants one problem with pydicom and scans.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from node.deid.engine import Deidentifier
from node.deid.values import Keyed
from protocols.deid.options import DeidOptions
from protocols.deid.profile import compile_profile
from protocols.phi import scanner
from protocols.phi.findings import PhiFinding, Severity
from protocols.phi.scanner import Originals, at_least, scan

SECRET = b"s" * 32
CT = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ORIGINAL_UID = "1.2.826.0.1.3680043.10.1043.99.4455.7"
DEFAULTS = DeidOptions()


def source(**extra: object) -> Dataset:
    """A small CT full of (fake) identity."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = ORIGINAL_UID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1043.99.4455.8"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1043.99.4455.9"
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.1043.99.4455.10"
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN0042517"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "050Y"
    ds.StudyDate = "20200315"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC7654321"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.Modality = "CT"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    code = Dataset()
    code.CodeValue = "51185008"
    code.CodingSchemeDesignator = "SCT"
    code.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([code])
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\x01\x02\x03\x04\x05\x06\x07\x08"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def encode(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def deidentify(data: bytes, options: DeidOptions = DEFAULTS) -> tuple[bytes, dict[str, Any]]:
    """The engine's output and its vault record."""
    result = Deidentifier(compile_profile(options), Keyed(SECRET, "SITE")).deidentify(data)
    return b"".join(bytes(c) for c in result.chunks), result.record


@pytest.fixture(scope="module")
def clean() -> tuple[bytes, dict[str, Any]]:
    return deidentify(encode(source()))


def edit(data: bytes, change: Callable[[Dataset], None]) -> bytes:
    """Read an output with pydicom, change it, write it back as it was encoded."""
    ds = pydicom.dcmread(io.BytesIO(data))
    change(ds)
    buffer = io.BytesIO()
    # As read: preamble and file meta as they are (pydicom would mend the meta otherwise).
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def kinds(findings: list[PhiFinding]) -> set[str]:
    return {f.kind for f in findings}


def only(findings: list[PhiFinding], kind: str) -> list[PhiFinding]:
    return [f for f in findings if f.kind == kind]


def node_scan(
    data: bytes, record: dict[str, Any], options: DeidOptions = DEFAULTS
) -> list[PhiFinding]:
    return scan(data, options, site_prefix="SITE", originals=Originals.from_records([record]))


# -- a correct output, an unreadable one ------------------------------------------------------


@pytest.mark.parametrize("options", [DEFAULTS, DeidOptions.basic()], ids=["defaults", "basic"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_correct_engine_output_has_no_finding(options: DeidOptions, syntax: str) -> None:
    # Prepare
    data, record = deidentify(encode(source(), syntax), options)

    # Execute
    on_node = node_scan(data, record, options)
    on_coordinator = scan(data, options)

    # Assert
    assert on_node == []
    assert on_coordinator == []


@pytest.mark.parametrize(
    "data",
    [b"", b"not a dicom file at all", b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"],
    ids=["empty", "text", "broken-meta"],
)
def test_unreadable_input_is_a_critical_finding(data: bytes) -> None:
    findings = scan(data, DEFAULTS)

    assert [f.kind for f in findings] == ["unreadable"]
    assert findings[0].severity is Severity.CRITICAL


def test_a_file_that_cannot_be_opened_is_unreadable(tmp_path: Path) -> None:
    findings = scan(tmp_path / "missing.dcm", DEFAULTS)

    assert kinds(findings) == {"unreadable"}


def test_a_cut_short_file_is_unreadable(clean: tuple[bytes, dict[str, Any]]) -> None:
    # Prepare: the pixel data loses its last bytes (pydicom reads it without a word).
    data, _ = clean

    findings = scan(data[:-4], DEFAULTS, site_prefix="SITE")

    assert only(findings, "unreadable")[0].location == "(7FE0,0010)"
    assert findings[0].severity is Severity.CRITICAL


def test_data_after_a_stray_delimiter_is_unreadable_and_searched(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: pydicom stops quietly at an item delimiter; a name hides behind it.
    data, record = clean
    hidden = b"\x10\x00\x10\x00PN\x08\x00DOE^JANE"
    tampered = data + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + hidden

    findings = node_scan(tampered, record)

    assert "unreadable" in kinds(findings)
    leaks = only(findings, "original_value")
    assert leaks and leaks[0].location.startswith("raw bytes @")


def test_undefined_length_and_un_oddities_do_not_crash(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: a private UN of undefined length holding an implicit-VR item with a name,
    # and one of undefined length that never ends.
    data, _ = clean
    name = b"DOE^JOHN"
    item = b"\x10\x00\x10\x00" + len(name).to_bytes(4, "little") + name
    nested = (
        b"\x09\x00\x10\x00LO\x04\x00ACME"  # private creator (0009,0010)
        + b"\x09\x00\x01\x10UN\x00\x00\xff\xff\xff\xff"
        + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        + item
        + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    )
    pixel = data.index(b"\xe0\x7f\x10\x00")
    with_sequence = data[:pixel] + nested + data[pixel:]
    never_ends = data[:pixel] + b"\x09\x00\x10\x00LO\x04\x00ACME\x09\x00\x01\x10UN\x00\x00"
    never_ends += b"\xff\xff\xff\xff" + b"\x01\x02" * 8

    sequence_findings = scan(with_sequence, DEFAULTS, site_prefix="SITE")
    broken_findings = scan(never_ends, DEFAULTS, site_prefix="SITE")

    names = only(sequence_findings, "person_name")
    assert [f.location for f in names] == ["(0009,1001)[0]/(0010,0010)"]
    assert "private_not_allowed" in kinds(sequence_findings)
    assert "unreadable" in kinds(broken_findings)


# -- the profile, element by element -------------------------------------------------------------


def test_an_attribute_the_profile_removes_is_not_removed(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare
    data, record = clean
    tampered = edit(data, lambda ds: setattr(ds, "InstitutionName", "St Elsewhere Hospital"))

    # Execute
    on_coordinator = scan(tampered, DEFAULTS, site_prefix="SITE")
    on_node = node_scan(tampered, record)

    # Assert
    found = only(on_coordinator, "not_removed")
    assert [(f.location, f.severity) for f in found] == [("(0008,0080)", Severity.HIGH)]
    assert found[0].excerpt.startswith("St ") and "Elsewhere" not in found[0].excerpt
    leak = only(on_node, "original_value")
    assert [(f.location, f.severity) for f in leak] == [("(0008,0080)", Severity.CRITICAL)]


def test_an_empty_element_that_should_be_removed_is_low(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    data, _ = clean
    tampered = edit(data, lambda ds: setattr(ds, "InstitutionName", ""))

    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    assert [(f.kind, f.severity) for f in findings] == [("not_removed", Severity.LOW)]


def test_an_attribute_the_profile_empties_is_not_emptied(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    data, _ = clean
    tampered = edit(data, lambda ds: setattr(ds, "AccessionNumber", "ACC7654321"))

    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    assert ("not_emptied", "(0008,0050)", Severity.HIGH) in {
        (f.kind, f.location, f.severity) for f in findings
    }
    assert "identifier_pattern" in kinds(findings)


@pytest.mark.parametrize(
    ("value", "severity"), [("SPONSOR INC", Severity.HIGH), ("", Severity.LOW)]
)
def test_an_attribute_the_profile_replaces_must_hold_the_dummy(
    clean: tuple[bytes, dict[str, Any]], value: str, severity: Severity
) -> None:
    # Prepare: Clinical Trial Sponsor Name is D (dummy "ANONYMIZED").
    data, _ = clean
    correct = edit(data, lambda ds: setattr(ds, "ClinicalTrialSponsorName", "ANONYMIZED"))
    tampered = edit(data, lambda ds: setattr(ds, "ClinicalTrialSponsorName", value))

    assert scan(correct, DEFAULTS, site_prefix="SITE") == []
    findings = scan(tampered, DEFAULTS, site_prefix="SITE")
    assert [(f.kind, f.location, f.severity) for f in findings] == [
        ("not_replaced", "(0012,0010)", severity)
    ]


def test_a_uid_the_profile_maps_is_not_replaced(clean: tuple[bytes, dict[str, Any]]) -> None:
    # Prepare
    data, record = clean
    frame = "1.2.826.0.1.3680043.10.1043.99.4455.10"
    tampered = edit(data, lambda ds: setattr(ds, "FrameOfReferenceUID", frame))

    # Execute
    findings = scan(tampered, DEFAULTS, site_prefix="SITE")
    retained = scan(tampered, DeidOptions().with_settings(["retain-uids"]), site_prefix="SITE")
    on_node = node_scan(tampered, record)

    # Assert
    assert {(f.kind, f.location) for f in findings} == {
        ("not_replaced", "(0020,0052)"),
        ("original_uid", "(0020,0052)"),
    }
    assert "original_uid" not in kinds(retained) and "not_replaced" not in kinds(retained)
    assert "original_uid" in kinds(on_node)


def test_a_private_sop_class_must_be_mapped(clean: tuple[bytes, dict[str, Any]]) -> None:
    data, _ = clean
    private_class = "1.2.826.0.1.3680043.10.1043.77.1"

    def change(ds: Dataset) -> None:
        ds.SOPClassUID = private_class
        ds.file_meta.MediaStorageSOPClassUID = private_class

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert ("not_replaced", "(0008,0016)") in {(f.kind, f.location) for f in findings}


def test_a_date_not_shifted_is_found_with_the_originals_only(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: the study date back to its original value.
    data, record = clean
    tampered = edit(data, lambda ds: setattr(ds, "StudyDate", "20200315"))
    full = DeidOptions().with_settings(["retain-longitudinal-full-dates"])
    kept_on_purpose, full_record = deidentify(encode(source()), full)

    # Execute
    on_node = node_scan(tampered, record)
    on_coordinator = scan(tampered, DEFAULTS, site_prefix="SITE")
    with_full_dates = node_scan(kept_on_purpose, full_record, full)

    # Assert
    found = only(on_node, "date_not_shifted")
    assert [(f.location, f.severity) for f in found] == [("(0008,0020)", Severity.HIGH)]
    assert "original_value" not in kinds(on_node)  # one date, one finding
    assert on_coordinator == []
    assert with_full_dates == []


def test_the_pseudonym_is_checked_at_the_top_and_nested(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare
    data, _ = clean

    def nested(ds: Dataset) -> None:
        ds.AnatomicRegionSequence[0].PatientName = "DOE^JANE"
        ds.AnatomicRegionSequence[0].PatientID = "MRN0042517"

    other_site = edit(data, lambda ds: setattr(ds, "PatientID", "OTHER-ABCDEFGHIJKL"))
    tampered = edit(data, nested)

    # Execute
    top = scan(other_site, DEFAULTS, site_prefix="SITE")
    inside = scan(tampered, DEFAULTS, site_prefix="SITE")
    without_prefix = scan(other_site, DEFAULTS)

    # Assert
    assert {(f.kind, f.location) for f in top} == {("not_replaced", "(0010,0020)")}
    assert {(f.kind, f.location, f.severity) for f in inside} >= {
        ("not_emptied", "(0008,2218)[0]/(0010,0010)", Severity.HIGH),
        ("person_name", "(0008,2218)[0]/(0010,0010)", Severity.CRITICAL),
        ("not_replaced", "(0008,2218)[0]/(0010,0020)", Severity.HIGH),
    }
    # Without the prefix the shape fits, but two pseudonyms for one patient do not.
    assert [f.message for f in without_prefix] == [
        "Patient's Name and Patient ID hold different pseudonyms"
    ]


def test_a_missing_pseudonym_is_not_replaced(clean: tuple[bytes, dict[str, Any]]) -> None:
    data, _ = clean

    findings = scan(edit(data, lambda ds: delattr(ds, "PatientName")), DEFAULTS)

    assert [(f.kind, f.location) for f in findings] == [("not_replaced", "(0010,0010)")]


# -- names, UIDs, originals -----------------------------------------------------------------------


def test_person_names_are_found_at_any_depth_private_and_un(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: a name in a private PN, in a public PN written as UN, in a UN sequence.
    data, _ = clean

    def change(ds: Dataset) -> None:
        ds.private_block(0x0011, "ACME PACS", create=True).add_new(0x01, "PN", "ROE^RICHARD")
        ds.add(DataElement(0x00081070, "UN", b"TECH^TERRY"))  # Operators' Name
        name = b"NURSE^NANCY "
        item = b"\x10\x00\x10\x00" + len(name).to_bytes(4, "little") + name
        value = b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item
        ds.add(DataElement(0x00400275, "UN", value))  # Request Attributes Sequence

    saved = pydicom.config.replace_un_with_known_vr
    pydicom.config.replace_un_with_known_vr = False
    try:
        tampered = edit(data, change)
    finally:
        pydicom.config.replace_un_with_known_vr = saved

    # Execute
    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    # Assert
    names = {(f.location, f.severity) for f in only(findings, "person_name")}
    assert names == {
        ("(0011,1001)", Severity.CRITICAL),
        ("(0008,1070)", Severity.CRITICAL),
        ("(0040,0275)[0]/(0010,0010)", Severity.CRITICAL),
    }
    assert all("RICHARD" not in f.excerpt for f in findings)


def test_dummies_and_the_pseudonym_are_not_person_names(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    data, _ = clean
    pseudonym = str(pydicom.dcmread(io.BytesIO(data)).PatientID)

    def change(ds: Dataset) -> None:
        ds.add(DataElement(0x0040A123, "PN", "ANONYMIZED"))  # Person Name: D
        ds.AnatomicRegionSequence[0].PatientID = pseudonym

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert findings == []


def test_original_uids_are_found(clean: tuple[bytes, dict[str, Any]]) -> None:
    # Prepare: a UID inside a kept sequence, and a 2.25 UID the input already had.
    data, record = clean
    native = "2.25.123456789012345678901234567890"
    record = {**record, "uids": [*record["uids"], [native, "2.25.1"]]}

    def change(ds: Dataset) -> None:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CT
        ref.ReferencedSOPInstanceUID = native
        other = Dataset()
        other.ReferencedSOPClassUID = CT
        other.ReferencedSOPInstanceUID = ORIGINAL_UID
        ds.ReferencedImageSequence = Sequence([ref, other])

    tampered = edit(data, change)

    # Execute
    on_coordinator = only(scan(tampered, DEFAULTS, site_prefix="SITE"), "original_uid")
    on_node = only(node_scan(tampered, record), "original_uid")

    # Assert
    assert [f.location for f in on_coordinator] == ["(0008,1140)[1]/(0008,1155)"]
    assert sorted(f.location for f in on_node) == [
        "(0008,1140)[0]/(0008,1155)",
        "(0008,1140)[1]/(0008,1155)",
    ]
    assert all(f.severity is Severity.HIGH for f in on_node)


@pytest.mark.parametrize(
    "planted",
    [
        "Jane Doe DOE JANE",
        "doe   jane",
        "DOEJANE",
        "seen 15 Mar 2020",
        "on 2020-03-15",
        "03/15/2020",
    ],
)
def test_original_values_are_found_exact_and_normalised(
    clean: tuple[bytes, dict[str, Any]], planted: str
) -> None:
    # Prepare: a kept text attribute (Software Versions) carries an original value.
    data, record = clean
    tampered = edit(data, lambda ds: setattr(ds, "SoftwareVersions", planted))

    findings = only(node_scan(tampered, record), "original_value")

    assert [(f.location, f.severity) for f in findings] == [("(0018,1020)", Severity.CRITICAL)]


def test_original_values_are_found_in_raw_bytes(clean: tuple[bytes, dict[str, Any]]) -> None:
    # Prepare: the MRN inside a kept binary element (ICC profile) no text check reads.
    data, record = clean
    tampered = edit(data, lambda ds: setattr(ds, "ICCProfile", b"\x00\x01MRN0042517\x00\x00"))

    findings = node_scan(tampered, record)

    assert [(f.kind, f.severity) for f in findings] == [("original_value", Severity.CRITICAL)]
    offset = int(findings[0].location.removeprefix("raw bytes @"))
    assert tampered[offset : offset + 10] == b"MRN0042517"


def test_a_deflated_data_set_is_searched_inflated() -> None:
    # Prepare: a deflated output whose kept binary element carries the MRN.
    data, record = deidentify(encode(source(), DeflatedExplicitVRLittleEndian))
    tampered = edit(data, lambda ds: setattr(ds, "ICCProfile", b"\x00\x01MRN0042517\x00\x00"))

    # Execute
    clean_findings = node_scan(data, record)
    findings = node_scan(tampered, record)

    # Assert
    assert b"MRN0042517" not in tampered  # compressed: only the inflated bytes show it
    assert clean_findings == []
    assert [(f.kind, f.location.split(" @")[0]) for f in findings] == [
        ("original_value", "inflated data set")
    ]


def test_a_word_removed_elsewhere_in_a_kept_attribute_is_low(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: the vault holds a plain word (the institution) and a kept attribute holds it.
    data, record = clean
    tampered = edit(data, lambda ds: setattr(ds, "Manufacturer", "St Elsewhere Hospital"))

    findings = node_scan(tampered, record)

    assert [(f.kind, f.severity) for f in findings] == [("original_value", Severity.LOW)]


def test_short_and_numeric_originals_do_not_match_by_chance() -> None:
    # Prepare: a short original value, a short number, and a date inside a UID.
    data, record = deidentify(encode(source(StationName="CT01", StudyID="4711")))
    record["uids"].append(["1.2.826.0.1.3680043.20200315.1", "2.25.7"])

    def change(ds: Dataset) -> None:
        ds.SoftwareVersions = "CT01_OC0 4711"  # "CT01" only as part of a word
        ds.ReferencedImageSequence = Sequence([Dataset()])
        ds.ReferencedImageSequence[0].ReferencedSOPClassUID = CT

    findings = node_scan(edit(data, change), record)

    assert findings == []


# -- identifier patterns --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("MRN1234567", "record or accession number"),
        ("acc: ACC-7654321", "record or accession number"),
        ("id 0012345678 here", "long digit run"),
        ("call +1-555-0123", "phone number"),
        ("(555) 123-4567", "phone or NHS number"),
        ("ext 555-1234", "phone number"),
        ("tel 030 12345678", "phone number"),
        ("jane.doe@example.org", "e-mail address"),
        ("12 Elm Street, Springfield", "street address"),
        ("1 Hospital Plaza", "street address"),
        ("12 Lindenweg", "street address"),
        ("Lindenweg 12", "street address"),
        ("Via Roma 12", "street address"),
        ("3 Rue Lafayette", "street address"),
        ("SSN 123-45-6789", "US social security number"),
        ("NI AB123456C", "national identity number"),
        ("CF RSSMRA85T10A562S", "national identity number"),
        ("pnr 850709-1234", "national identity number"),
    ],
)
def test_identifier_patterns_are_found(
    clean: tuple[bytes, dict[str, Any]], text: str, label: str
) -> None:
    # Prepare: the text in an attribute the profile removes, and in one it keeps.
    data, _ = clean
    removed = edit(data, lambda ds: setattr(ds, "StudyDescription", text))
    kept = edit(data, lambda ds: setattr(ds, "SoftwareVersions", text))

    # Execute
    in_removed = only(scan(removed, DEFAULTS, site_prefix="SITE"), "identifier_pattern")
    in_kept = only(scan(kept, DEFAULTS, site_prefix="SITE"), "identifier_pattern")

    # Assert
    assert (f"looks like a {label}", "(0008,1030)", Severity.MEDIUM) in {
        (f.message, f.location, f.severity) for f in in_removed
    }
    assert in_kept and all(f.severity is Severity.LOW for f in in_kept)


@pytest.mark.parametrize(
    "text",
    [
        "SITE-6P3T3VYYRJKI",
        "ANONYMIZED",
        "RADFED 0.1.0 PROFILE 2025.1",
        "PS3.15 E.1-1 BASIC",
        "CNRY00540",
        "CT CHEST W/O CONTRAST 5 mm",
        "1.2.840.10008.5.1.4.1.1.2",
        "kVp 120 mA 200 2.5 mm B30f",
        "Series 3 of 12, 2024-05-01",
        "Revolution rev1 18748-4",
    ],
)
def test_identifier_patterns_spare_ordinary_text(
    clean: tuple[bytes, dict[str, Any]], text: str
) -> None:
    data, _ = clean
    tampered = edit(data, lambda ds: setattr(ds, "StudyDescription", text))

    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    assert only(findings, "identifier_pattern") == []


def test_coded_values_are_not_identifiers(clean: tuple[bytes, dict[str, Any]]) -> None:
    data, _ = clean

    def change(ds: Dataset) -> None:
        ds.AnatomicRegionSequence[0].CodeValue = "1234567890"

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert findings == []


def test_identifiers_in_an_encapsulated_pdf_are_found(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: a PDF whose page text is in a compressed stream.
    data, _ = clean
    page = zlib.compress(b"BT (Patient MRN1234567, tel +44 20 7946 0958) Tj ET")
    pdf = b"%PDF-1.4\n1 0 obj <<>> stream\n" + page + b"\nendstream\nendobj\n%%EOF"
    tampered = edit(data, lambda ds: ds.add(DataElement(0x00420011, "OB", pdf)))

    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    labels = {f.message for f in only(findings, "identifier_pattern")}
    assert labels >= {"looks like a record or accession number", "looks like a phone number"}
    assert ("not_replaced", "(0042,0011)") in {(f.kind, f.location) for f in findings}


# -- private elements, file meta, method attributes ----------------------------------------------


def test_private_elements_follow_the_safe_private_option(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: an allowlisted b-value, a private element not on the list.
    data, _ = clean
    safe = DeidOptions().with_settings(["retain-safe-private"])

    def change(ds: Dataset) -> None:
        ds.private_block(0x0043, "GEMS_PARM_01", create=True).add_new(0x39, "IS", "1000")

    def unsafe(ds: Dataset) -> None:
        change(ds)
        ds.private_block(0x0043, "GEMS_PARM_01").add_new(0x40, "FL", 1.5)

    allowed = edit(data, change)
    not_allowed = edit(data, unsafe)

    # Execute
    option_off = scan(allowed, DEFAULTS, site_prefix="SITE")
    option_on = scan(allowed, safe, site_prefix="SITE")
    off_list = scan(not_allowed, safe, site_prefix="SITE")

    # Assert
    assert {(f.kind, f.location, f.severity) for f in option_off} == {
        ("private_not_allowed", "(0043,1039)", Severity.HIGH)
    }
    assert "private_not_allowed" not in kinds(option_on)
    assert [(f.kind, f.location) for f in off_list if f.kind == "private_not_allowed"] == [
        ("private_not_allowed", "(0043,1040)")
    ]


def test_orphan_creators_and_creatorless_private_elements(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    data, _ = clean

    def change(ds: Dataset) -> None:
        ds.add(DataElement(0x00090010, "LO", "ACME HOSPITAL PACS"))  # no element of its own
        ds.add(DataElement(0x00131001, "LO", "no creator"))

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert {(f.kind, f.location, f.severity) for f in findings} == {
        ("private_not_allowed", "(0009,0010)", Severity.MEDIUM),
        ("private_not_allowed", "(0013,1001)", Severity.HIGH),
    }


def test_file_meta_must_be_rebuilt(clean: tuple[bytes, dict[str, Any]]) -> None:
    data, _ = clean

    def change(ds: Dataset) -> None:
        ds.file_meta.SourceApplicationEntityTitle = "PACS_MAIN"
        ds.file_meta.MediaStorageSOPInstanceUID = "2.25.42"

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert {(f.kind, f.location, f.severity) for f in findings} == {
        ("file_meta", "file meta (0002,0016)", Severity.HIGH),
        ("file_meta", "file meta (0002,0003)", Severity.HIGH),
    }


@pytest.mark.parametrize(
    ("change", "location", "severity"),
    [
        (lambda ds: setattr(ds, "PatientIdentityRemoved", "NO"), "(0012,0062)", Severity.MEDIUM),
        (
            lambda ds: delattr(ds, "DeidentificationMethodCodeSequence"),
            "(0012,0064)",
            Severity.MEDIUM,
        ),
        (
            lambda ds: setattr(ds, "LongitudinalTemporalInformationModified", "UNMODIFIED"),
            "(0028,0303)",
            Severity.LOW,
        ),
    ],
    ids=["identity-removed", "code-sequence", "temporal"],
)
def test_method_attributes_must_match_the_options(
    clean: tuple[bytes, dict[str, Any]],
    change: Callable[[Dataset], None],
    location: str,
    severity: Severity,
) -> None:
    data, _ = clean

    findings = scan(edit(data, change), DEFAULTS, site_prefix="SITE")

    assert [(f.kind, f.location, f.severity) for f in findings] == [
        ("method_attributes", location, severity)
    ]


def test_method_codes_that_claim_other_options_are_found(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: an output made with the defaults, scanned as if every option were off.
    data, _ = clean

    findings = scan(data, DeidOptions.basic(), site_prefix="SITE")

    codes = [f for f in findings if f.location == "(0012,0064)"]
    assert len(codes) == 1 and "unexpected: 113107, 113108" in codes[0].message


def test_a_duplicated_element_is_malformed_and_its_hidden_copy_checked(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: a second Patient's Name before the pseudonym (pydicom shows only the last).
    data, _ = clean
    at = data.index(b"\x10\x00\x10\x00PN")
    tampered = data[:at] + b"\x10\x00\x10\x00PN\x08\x00DOE^JANE" + data[at:]

    findings = scan(tampered, DEFAULTS, site_prefix="SITE")

    assert {(f.kind, f.location) for f in findings} >= {
        ("malformed", "(0010,0010)"),
        ("person_name", "(0010,0010) (hidden copy)"),
    }


# -- the API ---------------------------------------------------------------------------------------


def test_findings_sort_most_severe_first_and_thresholds_filter(
    clean: tuple[bytes, dict[str, Any]],
) -> None:
    # Prepare: one LOW, one MEDIUM, one HIGH and one CRITICAL problem.
    data, record = clean

    def change(ds: Dataset) -> None:
        ds.LongitudinalTemporalInformationModified = "REMOVED"  # LOW
        ds.PatientIdentityRemoved = "NO"  # MEDIUM
        ds.StationName = "ROOM 3"  # HIGH (not removed)
        ds.OperatorsName = "TECH^TERRY"  # CRITICAL (a person name)

    findings = node_scan(edit(data, change), record)

    severities = [f.severity for f in findings]
    assert severities == sorted(severities, reverse=True)
    assert set(severities) == {Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL}
    assert {f.severity for f in at_least(findings, Severity.HIGH)} == {
        Severity.HIGH,
        Severity.CRITICAL,
    }
    assert at_least(findings, Severity.parse("critical"))[0].kind == "person_name"


def test_originals_come_from_vault_records(clean: tuple[bytes, dict[str, Any]]) -> None:
    _, record = clean

    originals = Originals.from_records([record, {"study_date": "20210101"}])

    assert {"DOE^JANE", "MRN0042517", "ACC7654321", "St Elsewhere Hospital"} <= originals.values
    assert {"20200315", "19700101", "20210101"} <= originals.dates
    assert ORIGINAL_UID in originals.uids and CT not in originals.uids


@pytest.mark.parametrize(
    "records",
    [[["not", "a", "mapping"]], [{"originals": "DOE"}], [{"uids": [["1.2.3"]]}]],
    ids=["not-a-mapping", "originals-not-a-list", "uid-not-a-pair"],
)
def test_bad_records_name_the_argument(records: list[Any]) -> None:
    with pytest.raises((TypeError, ValueError), match='Argument "records"'):
        Originals.from_records(records)


def test_bad_arguments_are_named(clean: tuple[bytes, dict[str, Any]]) -> None:
    data, _ = clean

    with pytest.raises(ValueError, match='Argument "site_prefix"'):
        scan(data, DEFAULTS, site_prefix="site a")
    with pytest.raises(TypeError, match='Argument "source"'):
        scan(42, DEFAULTS)  # type: ignore[arg-type]


def test_the_plain_search_finds_what_the_automaton_finds(
    clean: tuple[bytes, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: originals in an element and in raw bytes; the C automaton switched off.
    data, record = clean

    def change(ds: Dataset) -> None:
        ds.SoftwareVersions = "doe  jane"
        ds.ICCProfile = b"\x00ACC7654321\x00"

    tampered = edit(data, change)
    with_automaton = node_scan(tampered, record)
    scanner._index.cache_clear()
    monkeypatch.setattr(scanner, "_AHOCORASICK", None)

    without = node_scan(tampered, record)
    scanner._index.cache_clear()

    assert without == with_automaton
    assert len(only(without, "original_value")) == 2

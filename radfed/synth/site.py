"""A synthetic hospital site: chest CT, CR/DX, ultrasound and SR studies full of (fake) PHI.

Names, MRNs, accession numbers, dates and institutions are invented from a
seeded RNG; pixel data is generated. The same arguments give the same files.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1043."  # synthetic data only
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

FIRST = ["ANNA", "BRUNO", "CLARA", "DIEGO", "EMMA", "FELIX", "GRETA", "HUGO", "IRIS", "JONAS"]
LAST = ["MUELLER", "ROSSI", "GARCIA", "NOVAK", "SILVA", "DUBOIS", "KOWALSKI", "JENSEN"]
STREETS = ["Elm Street", "Harbour Road", "Lindenweg", "Via Roma", "Rue Lafayette"]


@dataclass
class Patient:
    """A synthetic patient and the identifiers planted in their files."""

    name: str
    patient_id: str
    birth_date: str
    sex: str
    age: str
    weight: str
    size: str
    address: str
    phone: str
    studies: list[str] = field(default_factory=list)


@dataclass
class SiteCorpus:
    root: Path
    files: list[Path]
    patients: list[Patient]


class Uids:
    """Deterministic synthetic UIDs (they embed the MRN, as some PACS do)."""

    def __init__(self, seed: int) -> None:
        self._n = 0
        self._seed = seed

    def new(self, mrn: str = "") -> str:
        self._n += 1
        return f"{UID_ROOT}{self._seed}.{mrn or 0}.{self._n}"


def file_meta(sop_class: str, sop_instance: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.SourceApplicationEntityTitle = "PACS_MAIN"
    return meta


def make_patient(rng: random.Random, index: int) -> Patient:
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=rng.randrange(0, 365 * 60))
    age = 2021 - birth.year
    return Patient(
        name=f"{rng.choice(LAST)}^{rng.choice(FIRST)}^^DR{index}",
        patient_id=f"MRN{rng.randrange(10**7, 10**8)}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=rng.choice("MF"),
        age=f"{age:03d}Y",
        weight=f"{rng.randrange(45, 120)}",
        size=f"{rng.randrange(150, 200) / 100:.2f}",
        address=f"{rng.randrange(1, 200)} {rng.choice(STREETS)}, Springfield",
        phone=f"+1-555-{rng.randrange(1000, 9999)}",
    )


def _patient_study(ds: Dataset, p: Patient, study_uid: str, when: dt.datetime, acc: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = "SPRINGFIELD GENERAL"
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    ds.PatientAge = p.age
    ds.PatientWeight = p.weight
    ds.PatientSize = p.size
    ds.PatientAddress = p.address
    ds.PatientTelephoneNumbers = p.phone
    ds.OtherPatientIDs = p.patient_id.replace("MRN", "ALT")
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.AccessionNumber = acc
    ds.StudyID = acc[-6:]
    ds.ReferringPhysicianName = "HOUSE^GREGORY^^DR"
    ds.InstitutionName = "Springfield General Hospital"
    ds.InstitutionAddress = "1 Hospital Plaza, Springfield"
    ds.StationName = "CT-ROOM-3"
    ds.OperatorsName = "TECH^TERRY"
    ds.PerformingPhysicianName = "WILSON^JAMES"


def _private_ge(ds: Dataset, p: Patient) -> None:
    block = ds.private_block(0x0009, "GEMS_IDEN_01", create=True)
    block.add_new(0x01, "LO", f"{p.name} {p.patient_id}")
    block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
    block.add_new(0x39, "IS", ["1000", "8", "0", "0"])


def ct_series(
    p: Patient,
    uids: Uids,
    study_uid: str,
    when: dt.datetime,
    acc: str,
    slices: int,
    size: int,
    rng: np.random.Generator,
    syntax: str = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """A chest CT series, 16-bit, HU through rescale, each slice referencing the previous."""
    series_uid = uids.new(p.patient_id[3:])
    frame_uid = uids.new()
    base = (rng.normal(0, 30, (size, size)) + 1024).astype(np.int16)
    out = []
    previous: str | None = None
    for i in range(slices):
        ds = Dataset()
        _patient_study(ds, p, study_uid, when, acc)
        ds.SOPClassUID = CT_IMAGE
        ds.SOPInstanceUID = uids.new(p.patient_id[3:])
        ds.Modality = "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.SeriesDate = ds.StudyDate
        ds.SeriesTime = ds.StudyTime
        ds.AcquisitionDate = ds.StudyDate
        ds.ContentDate = ds.StudyDate
        ds.ContentTime = ds.StudyTime
        ds.SeriesDescription = f"CHEST W/O {p.name.split('^')[0]}"
        ds.StudyDescription = "CT CHEST"
        ds.BodyPartExamined = "CHEST"
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ManufacturerModelName = "Revolution"
        ds.DeviceSerialNumber = "SN-778899"
        ds.SoftwareVersions = "rev1"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = i + 1
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-250.0, -250.0, -float(i) * 2.5]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.SliceLocation = -float(i) * 2.5
        ds.KVP = 120
        ds.XRayTubeCurrent = 200
        ds.ConvolutionKernel = "STANDARD"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size
        ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.BurnedInAnnotation = "NO"
        if previous is not None:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CT_IMAGE
            ref.ReferencedSOPInstanceUID = previous
            ds.ReferencedImageSequence = Sequence([ref])
        _private_ge(ds, p)
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        ds.file_meta = file_meta(CT_IMAGE, ds.SOPInstanceUID, syntax)
        previous = ds.SOPInstanceUID
        out.append(ds)
    return out


def radiograph(
    p: Patient,
    uids: Uids,
    study_uid: str,
    when: dt.datetime,
    acc: str,
    size: int,
    rng: np.random.Generator,
    dx: bool = False,
) -> Dataset:
    """A chest radiograph (CR, or DX when ``dx``), 12 bits in 16."""
    ds = Dataset()
    _patient_study(ds, p, study_uid, when, acc)
    ds.SOPClassUID = DX_IMAGE if dx else CR_IMAGE
    ds.SOPInstanceUID = uids.new(p.patient_id[3:])
    ds.Modality = "DX" if dx else "CR"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesInstanceUID = uids.new()
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "AGFA"
    ds.ManufacturerModelName = "DX-D 600"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.KVP = 110
    ds.ExposureTime = 10
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.BurnedInAnnotation = "NO"
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return ds


def ultrasound(
    p: Patient, uids: Uids, study_uid: str, when: dt.datetime, acc: str, rng: np.random.Generator
) -> Dataset:
    """An ultrasound frame with a text banner burned into the pixels (BurnedInAnnotation YES)."""
    ds = Dataset()
    _patient_study(ds, p, study_uid, when, acc)
    ds.SOPClassUID = US_IMAGE
    ds.SOPInstanceUID = uids.new()
    ds.Modality = "US"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesInstanceUID = uids.new()
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 240
    ds.Columns = 320
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # Speckle-like background: smooth, low-contrast noise (what OCR sees on real scans).
    noise = rng.normal(40, 8, (60, 80)).clip(0, 255)
    pixels = np.kron(noise, np.ones((4, 4))).astype(np.uint8)
    # The banner a real scanner burns in: the patient's name and ID, in the pixels.
    burn_text(pixels, f"{p.name.split('^')[0]} {p.patient_id}", (6, 4))
    ds.PixelData = pixels.tobytes()
    ds.file_meta = file_meta(US_IMAGE, ds.SOPInstanceUID, ExplicitVRLittleEndian)
    return ds


def burn_text(pixels: np.ndarray, text: str, at: tuple[int, int], size: int = 18) -> None:
    """Draw ``text`` into an 8-bit frame in place (white on the image), as scanners do."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).text(at, text, fill=255, font=ImageFont.load_default(size=size))
    pixels[...] = np.asarray(image)


def text_report(
    p: Patient, uids: Uids, study_uid: str, when: dt.datetime, acc: str, image: Dataset
) -> Dataset:
    """A basic text SR: the radiologist's report, referencing one image of the study."""
    ds = Dataset()
    _patient_study(ds, p, study_uid, when, acc)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = uids.new()
    ds.Modality = "SR"
    ds.SeriesInstanceUID = uids.new()
    ds.SeriesNumber = 9
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    title = Dataset()
    title.CodeValue = "18748-4"
    title.CodingSchemeDesignator = "LN"
    title.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = Sequence([title])
    finding = Dataset()
    finding.RelationshipType = "CONTAINS"
    finding.ValueType = "TEXT"
    name = Dataset()
    name.CodeValue = "121071"
    name.CodingSchemeDesignator = "DCM"
    name.CodeMeaning = "Finding"
    finding.ConceptNameCodeSequence = Sequence([name])
    finding.TextValue = (
        f"Patient {p.name.replace('^', ' ')} ({p.patient_id}), seen {ds.StudyDate}: "
        "bilateral ground-glass opacities."
    )
    ref_item = Dataset()
    ref_item.RelationshipType = "INFERRED FROM"
    ref_item.ValueType = "IMAGE"
    img_name = Dataset()
    img_name.CodeValue = "121080"
    img_name.CodingSchemeDesignator = "DCM"
    img_name.CodeMeaning = "Best illustration of finding"
    ref_item.ConceptNameCodeSequence = Sequence([img_name])
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ref_item.ReferencedSOPSequence = Sequence([ref])
    finding.ContentSequence = Sequence([ref_item])
    ds.ContentSequence = Sequence([finding])
    evidence = Dataset()
    evidence.StudyInstanceUID = study_uid
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    inst = Dataset()
    inst.ReferencedSOPClassUID = image.SOPClassUID
    inst.ReferencedSOPInstanceUID = image.SOPInstanceUID
    series.ReferencedSOPSequence = Sequence([inst])
    evidence.ReferencedSeriesSequence = Sequence([series])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([evidence])
    ds.file_meta = file_meta(BASIC_TEXT_SR, ds.SOPInstanceUID, ImplicitVRLittleEndian)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_site_corpus(
    root: Path,
    patients: int = 3,
    ct_slices: int = 8,
    ct_size: int = 128,
    cr_size: int = 256,
    seed: int = 0,
    with_us: bool = True,
    with_sr: bool = True,
) -> SiteCorpus:
    """Write a site's exams under ``root`` in a PACS-export layout named after the patients.

    Folder and file names carry names and MRNs on purpose: de-identification
    must not copy them.
    """
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    uids = Uids(seed)
    files: list[Path] = []
    people: list[Patient] = []
    for index in range(patients):
        p = make_patient(rng, index)
        people.append(p)
        folder = root / f"{p.name.split('^')[0]}_{p.patient_id}"
        when = dt.datetime(2020, 3, 1, 8, 0) + dt.timedelta(
            days=rng.randrange(0, 200), minutes=index
        )
        study = uids.new(p.patient_id[3:])
        p.studies.append(study)
        acc = f"ACC{rng.randrange(10**6, 10**7)}"
        series = ct_series(p, uids, study, when, acc, ct_slices, ct_size, nprng)
        for i, ds in enumerate(series):
            files.append(write(ds, folder / "CT" / f"IM{i:04d}.dcm"))
        later = when + dt.timedelta(days=3)
        study2 = uids.new(p.patient_id[3:])
        p.studies.append(study2)
        acc2 = f"ACC{rng.randrange(10**6, 10**7)}"
        cr = radiograph(p, uids, study2, later, acc2, cr_size, nprng, dx=index % 2 == 1)
        files.append(write(cr, folder / "XR" / f"{p.patient_id}.dcm"))
        if with_us and index == 0:
            files.append(
                write(ultrasound(p, uids, study2, later, acc2, nprng), folder / "US" / "US1.dcm")
            )
        if with_sr:
            report = text_report(p, uids, study, when, acc, series[0])
            files.append(write(report, folder / "SR" / "report.dcm"))
    return SiteCorpus(root=root, files=files, patients=people)

"""The PHI-canary corpus: unique canary values planted wherever identity can hide.

Every attribute of PS3.15 Table E.1-1 that pydicom can write gets a unique
canary value (text tokens ``CNRY00042``, unique dates, times, numbers and
UIDs that embed the patient's MRN) at the top level of a "kitchen sink"
instance; more canaries go into sequences nested three and more deep (inside
removed and inside kept sequences), private elements of several creators (GE,
Siemens CSA, Philips, an unknown vendor with private SQ/PN/UN/DA/UI), the file
meta (Source AE Title, Private Information), Data Set Trailing Padding,
overlay and curve descriptions, and public attributes encoded as UN (a UN
sequence included). Around those: CT 512×512 16-bit slices that reference each
other, a large CR and DX, a text SR referencing the CT, an ultrasound with
BurnedInAnnotation YES and a secondary capture, in several transfer syntaxes.

The returned :class:`CanaryCorpus` says what was planted, so tests can prove
that none of it survives de-identification (and that what the options keep
does).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom.config
import pydicom.datadict as dd
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from protocols.deid import table
from radfed.synth.site import BASIC_TEXT_SR, CR_IMAGE, CT_IMAGE, DX_IMAGE, UID_ROOT, US_IMAGE

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASE_DATE = dt.date(2020, 1, 1)
#: Planted dates all fall in [BASE_DATE, BASE_DATE + DATE_WINDOW): shifted dates
#: (at least 365 days back) can never collide with an original.
DATE_WINDOW = 300

#: Rows the generator sets as real structure rather than as free canaries.
_STRUCTURAL = {
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "PatientName",
    "FrameOfReferenceUID",
    "ReferencedImageSequence",
    "ReferencedSOPInstanceUID",
    "ReferencedSOPInstanceUIDInFile",
    "SourceImageSequence",
    "ContentSequence",
}


@dataclass
class Planted:
    """One planted value: where, what, and how a test recognises it in raw bytes."""

    where: str
    keyword: str
    vr: str
    value: object
    needle: bytes | None


@dataclass
class CanaryCorpus:
    root: Path
    files: list[Path] = field(default_factory=list)
    #: Needle bytes that must not appear anywhere in any output, by description.
    needles: dict[bytes, str] = field(default_factory=dict)
    #: Needles a site's default options keep on purpose (Patient Characteristics
    #: K rows, and times: modified dates keep times) — allowed under the defaults only.
    kept_by_defaults: dict[bytes, str] = field(default_factory=dict)
    #: Every non-standard UID in the input, at any depth.
    original_uids: set[str] = field(default_factory=set)
    #: Patient ID -> the MRN digits its UIDs embed.
    mrns: dict[str, str] = field(default_factory=dict)
    #: Source file -> sha256 of its pixel data bytes.
    pixel_sha256: dict[str, str] = field(default_factory=dict)
    #: Source file -> whether de-identification must flag it for burned-in risk.
    burned_in_risk: dict[str, bool] = field(default_factory=dict)
    #: Source file -> its patient ID (for the date-shift checks).
    patient_of: dict[str, str] = field(default_factory=dict)
    planted: list[Planted] = field(default_factory=list)


class _Tokens:
    """Unique canary values per VR."""

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n

    def text(self) -> str:
        return f"CNRY{self.next():05d}"

    def number(self) -> str:
        return f"1987{self.next():05d}"

    def date(self) -> str:
        n = self.next()
        return (BASE_DATE + dt.timedelta(days=n % DATE_WINDOW)).strftime("%Y%m%d")

    def time(self) -> str:
        n = self.next()
        return f"{10 + n % 12:02d}{n % 60:02d}{(n * 7) % 60:02d}.{n:06d}"


class CanaryBuilder:
    """Builds the corpus; one instance per corpus."""

    def __init__(self, root: Path, seed: int = 7) -> None:
        self.corpus = CanaryCorpus(root=root)
        self.tokens = _Tokens()
        self.rng = np.random.default_rng(seed)
        self._uid_n = 0
        self._dates: dict[str, str] = {}  # one date per keyword: consistent across files

    # -- values -------------------------------------------------------------------------

    def uid(self, mrn: str) -> str:
        self._uid_n += 1
        uid = f"{UID_ROOT}99.{mrn}.{self._uid_n}"
        self.corpus.original_uids.add(uid)
        return uid

    def _needle(self, needle: bytes, where: str, kept: bool = False) -> None:
        if kept:
            self.corpus.kept_by_defaults[needle] = where
        else:
            self.corpus.needles[needle] = where

    def value_for(self, vr: str, keyword: str, mrn: str, where: str) -> tuple[object, bytes | None]:
        """A canary value for a VR and the bytes that reveal it."""
        if vr in ("AE", "CS", "LO", "LT", "SH", "ST", "UC", "UT"):
            token = self.tokens.text()
            return token, token.encode()
        if vr == "PN":
            token = self.tokens.text()
            return f"{token}^CANARY", token.encode()
        if vr in ("DS", "IS"):
            number = self.tokens.number()
            return number, number.encode()
        if vr == "DA":
            date = self._dates.setdefault(keyword, self.tokens.date())
            return date, date.encode()
        if vr == "DT":
            date = self._dates.setdefault(keyword, self.tokens.date())
            return date + "101010", date.encode()
        if vr == "TM":
            time = self.tokens.time()
            return time, time.encode()
        if vr == "AS":
            age = {"PatientAge": "077Y"}.get(keyword, "066Y")
            return age, age.encode()
        if vr == "UI":
            uid = self.uid(mrn)
            return uid, uid.encode()
        if vr == "UR":
            token = self.tokens.text()
            return f"http://{token.lower()}.example.org/", token.lower().encode()
        if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            token = self.tokens.text()
            return (token + "-BINARY").encode(), token.encode()
        if vr in ("US", "SS"):
            return 7, None
        if vr in ("UL", "SL"):
            return 70707, None
        if vr in ("FL", "FD"):
            return 7.07, None
        raise ValueError(f"no canary for VR {vr} ({where})")

    def plant(self, ds: Dataset, keyword: str, mrn: str, where: str, kept: bool = False) -> None:
        tag = dd.tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"unknown keyword {keyword}")
        vr = str(dd.dictionary_VR(tag)).split(" or ")[0]
        if vr == "SQ":
            ds.add(DataElement(tag, "SQ", Sequence([self.nested_item(mrn, f"{where}>{keyword}")])))
            return
        value, needle = self.value_for(vr, keyword, mrn, f"{where}>{keyword}")
        ds.add(DataElement(tag, vr, value))
        self.corpus.planted.append(Planted(where, keyword, vr, value, needle))
        if needle is not None:
            keep = kept or vr == "TM"
            self._needle(needle, f"{where}>{keyword}", keep)

    def nested_item(self, mrn: str, where: str, depth: int = 1) -> Dataset:
        """An item with canaries, a private element and deeper sequences (3+ levels)."""
        item = Dataset()
        for keyword in ("PatientName", "InstitutionName", "AccessionNumber", "StudyDate"):
            self.plant(item, keyword, mrn, where)
        self.private_unknown(item, mrn, where, with_sequence=False)
        if depth < 4:
            inner = self.nested_item(mrn, f"{where}>item{depth + 1}", depth + 1)
            item.add(DataElement(0x00081250, "SQ", Sequence([inner])))  # RelatedSeriesSequence (X)
        return item

    # -- private elements -----------------------------------------------------------------

    def private_unknown(self, ds: Dataset, mrn: str, where: str, with_sequence: bool) -> None:
        block = ds.private_block(0x0011, "ACME HOSPITAL PACS 1.0", create=True)
        token = self.tokens.text()
        block.add_new(0x01, "PN", f"{token}^PRIVATE")
        self._needle(token.encode(), f"{where}>private PN")
        token = self.tokens.text()
        block.add_new(0x02, "UN", (token + "-UNKNOWN").encode())
        self._needle(token.encode(), f"{where}>private UN")
        date = self.tokens.date()
        block.add_new(0x03, "DA", date)
        self._needle(date.encode(), f"{where}>private DA")
        uid = self.uid(mrn)
        block.add_new(0x04, "UI", uid)
        self._needle(uid.encode(), f"{where}>private UI")
        if with_sequence:
            inner = Dataset()
            token = self.tokens.text()
            inner.PatientName = f"{token}^INPRIVATESQ"
            self._needle(token.encode(), f"{where}>private SQ>PatientName")
            inner_block = inner.private_block(0x0011, "ACME HOSPITAL PACS 1.0", create=True)
            token = self.tokens.text()
            inner_block.add_new(0x01, "LO", token)
            self._needle(token.encode(), f"{where}>private SQ>private LO")
            block.add_new(0x05, "SQ", Sequence([inner]))

    def private_vendors(self, ds: Dataset, mrn: str, where: str) -> None:
        token = self.tokens.text()
        ge = ds.private_block(0x0009, "GEMS_IDEN_01", create=True)
        ge.add_new(0x01, "LO", f"{token} FULL NAME")
        self._needle(token.encode(), f"{where}>GE GEMS_IDEN_01")
        parm = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        parm.add_new(0x39, "IS", ["1000", "8", "0", "0"])  # on the safe-private allowlist
        token = self.tokens.text()
        csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        csa.add_new(
            0x10, "OB", b"SV10\x04\x03\x02\x01" + token.encode() + b"\x00\x00PatientName\x00"
        )
        self._needle(token.encode(), f"{where}>Siemens CSA")
        token = self.tokens.text()
        philips = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        philips.add_new(0x03, "FL", 1000.0)  # on the safe-private allowlist
        philips.add_new(0x70, "LO", token)
        self._needle(token.encode(), f"{where}>Philips")
        self.private_unknown(ds, mrn, where, with_sequence=True)

    # -- special places ------------------------------------------------------------------

    def overlays_curves_padding(self, ds: Dataset, where: str, rows: int, columns: int) -> None:
        ds.add_new(0x60000010, "US", rows)
        ds.add_new(0x60000011, "US", columns)
        ds.add_new(0x60000040, "CS", "G")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        token = self.tokens.text()
        ds.add_new(0x60000022, "LO", token)  # Overlay Description
        self._needle(token.encode(), f"{where}>OverlayDescription")
        token = self.tokens.text()
        ds.add_new(0x60001500, "LO", token)  # Overlay Label
        self._needle(token.encode(), f"{where}>OverlayLabel")
        token = self.tokens.text()
        ds.add_new(0x60004000, "LT", token)  # Overlay Comments
        self._needle(token.encode(), f"{where}>OverlayComments")
        bits = bytearray((rows * columns + 7) // 8)
        marker = self.tokens.text().encode()
        bits[: len(marker)] = marker
        ds.add_new(0x60003000, "OW", bytes(bits) + b"\x00" * (len(bits) % 2))
        self._needle(marker, f"{where}>OverlayData")
        token = self.tokens.text()
        ds.add_new(0x50002500, "LO", token)  # Curve Label
        self._needle(token.encode(), f"{where}>CurveLabel")
        token = self.tokens.text()
        ds.add_new(0x50003000, "OB", (token + "-CURVE").encode())
        self._needle(token.encode(), f"{where}>CurveData")
        token = self.tokens.text()
        ds.add_new(0xFFFCFFFC, "OB", (token + "-PADDING").encode())
        self._needle(token.encode(), f"{where}>DataSetTrailingPadding")

    def un_encoded(self, ds: Dataset, where: str) -> None:
        """Public attributes written with VR UN, one of them a sequence."""
        token = self.tokens.text()
        ds.add(DataElement(0x00102180, "UN", (token + " ").encode()))  # Occupation
        self._needle(token.encode(), f"{where}>Occupation as UN")
        token = self.tokens.text()
        name = token.encode() + b"^UN "
        item = (
            b"\x10\x00\x10\x00" + len(name).to_bytes(4, "little") + name  # PatientName
        )
        value = b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item
        ds.add(DataElement(0x00400275, "UN", value))  # Request Attributes Sequence as UN
        self._needle(token.encode(), f"{where}>RequestAttributesSequence as UN>PatientName")

    def kept_sequences(self, ds: Dataset, mrn: str, where: str) -> None:
        """Canaries inside sequences the keep-list keeps: the walk must still clean them."""
        code = Dataset()
        code.CodeValue = "51185008"
        code.CodingSchemeDesignator = "SCT"
        code.CodeMeaning = "Chest"
        self.plant(code, "PatientName", mrn, f"{where}>AnatomicRegionSequence")
        self.private_unknown(code, mrn, f"{where}>AnatomicRegionSequence", with_sequence=False)
        ds.AnatomicRegionSequence = Sequence([code])
        measures = Dataset()
        measures.PixelSpacing = [0.7, 0.7]
        measures.SliceThickness = 2.5
        self.plant(measures, "OperatorsName", mrn, f"{where}>Shared>PixelMeasures")
        deepest = Dataset()
        self.plant(deepest, "PatientBirthName", mrn, f"{where}>Shared>PixelMeasures>Voi")
        deepest.WindowCenter = 40
        deepest.WindowWidth = 400
        measures.FrameVOILUTSequence = Sequence([deepest])
        group = Dataset()
        group.PixelMeasuresSequence = Sequence([measures])
        self.plant(group, "InstitutionAddress", mrn, f"{where}>Shared")
        ds.SharedFunctionalGroupsSequence = Sequence([group])

    # -- instances ----------------------------------------------------------------------

    def patient_module(self, ds: Dataset, patient_id: str, name_token: str) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = f"{name_token}^PATIENT"
        ds.PatientID = patient_id

    def kitchen_sink(self, ds: Dataset, mrn: str, where: str, kept_options: bool = True) -> None:
        """Plant every Table E.1-1 attribute pydicom can write at the top level."""
        for pattern, keyword, _name, _basic, options in table.ROWS:
            if not keyword or keyword in _STRUCTURAL or pattern[:4] in ("0000", "0002"):
                continue
            if keyword in ds:
                continue
            kept = kept_options and any(
                column == "rtnPatCharsOpt" and action == "K" for column, action in options
            )
            self.plant(ds, keyword, mrn, where, kept=kept)

    def meta(
        self, sop_class: str, sop_uid: str, syntax: str, mrn: str, where: str
    ) -> FileMetaDataset:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = syntax
        meta.ImplementationClassUID = f"{UID_ROOT}1"
        token = self.tokens.text()
        meta.SourceApplicationEntityTitle = token
        self._needle(token.encode(), f"{where}>meta SourceApplicationEntityTitle")
        token = self.tokens.text()
        meta.SendingApplicationEntityTitle = token
        self._needle(token.encode(), f"{where}>meta SendingApplicationEntityTitle")
        meta.PrivateInformationCreatorUID = self.uid(mrn)
        token = self.tokens.text()
        meta.PrivateInformation = (token + "-PRIVINFO").encode()
        self._needle(token.encode(), f"{where}>meta PrivateInformation")
        return meta

    def image(
        self,
        patient_id: str,
        name_token: str,
        mrn: str,
        study_uid: str,
        series_uid: str,
        frame_uid: str,
        sop_class: str,
        modality: str,
        rows: int,
        columns: int,
        where: str,
        sink: bool,
    ) -> Dataset:
        ds = Dataset()
        self.patient_module(ds, patient_id, name_token)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = self.uid(mrn)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if sink:
            self.kitchen_sink(ds, mrn, where)
            self.private_vendors(ds, mrn, where)
            self.overlays_curves_padding(ds, where, rows, columns)
            self.un_encoded(ds, where)
            self.kept_sequences(ds, mrn, where)
        else:
            for keyword in (
                "StudyDate",
                "SeriesDate",
                "ContentDate",
                "AccessionNumber",
                "InstitutionName",
                "ReferringPhysicianName",
                "StudyTime",
            ):
                self.plant(ds, keyword, mrn, where)
        # 12-bit pixels: no two consecutive bytes can both be printable ASCII, so
        # no canary can appear inside pixel data by chance.
        pixels = self.rng.integers(0, 4096, (rows, columns), dtype=np.uint16)
        ds.PixelData = pixels.tobytes()
        return ds

    def save(self, ds: Dataset, path: Path, syntax: str, mrn: str, risk: bool) -> None:
        where = str(path.relative_to(self.corpus.root))
        ds.file_meta = self.meta(ds.SOPClassUID, ds.SOPInstanceUID, syntax, mrn, where)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        self.corpus.files.append(path)
        if "PixelData" in ds:
            self.corpus.pixel_sha256[str(path)] = hashlib.sha256(ds.PixelData).hexdigest()
        self.corpus.burned_in_risk[str(path)] = risk
        self.corpus.patient_of[str(path)] = str(ds.PatientID)


def write_canary_corpus(
    root: Path,
    patients: int = 3,
    ct_slices: int = 3,
    ct_size: int = 512,
    cr_size: int = 2048,
    seed: int = 7,
) -> CanaryCorpus:
    """Write the corpus under ``root`` (folders named after patients, on purpose)."""
    # UN elements must stay UN on the way out (pydicom would turn them into their VR).
    saved = pydicom.config.replace_un_with_known_vr
    pydicom.config.replace_un_with_known_vr = False
    try:
        return _write(root, patients, ct_slices, ct_size, cr_size, seed)
    finally:
        pydicom.config.replace_un_with_known_vr = saved


def _write(
    root: Path, patients: int, ct_slices: int, ct_size: int, cr_size: int, seed: int
) -> CanaryCorpus:
    b = CanaryBuilder(root, seed)
    corpus = b.corpus
    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    for index in range(patients):
        mrn = f"44556677{index:02d}"
        patient_id = f"MRN{mrn}"
        corpus.mrns[patient_id] = mrn
        b._needle(mrn.encode(), f"patient {index} MRN")
        name_token = b.tokens.text()
        b._needle(name_token.encode(), f"patient {index} name")
        folder = root / f"{name_token}_{patient_id}"
        study_uid = b.uid(mrn)
        series_uid = b.uid(mrn)
        frame_uid = b.uid(mrn)

        # CT slices, every one a kitchen sink, each referencing the previous slice.
        previous: Dataset | None = None
        first_ct: Dataset | None = None
        for s in range(ct_slices):
            ds = b.image(
                patient_id,
                name_token,
                mrn,
                study_uid,
                series_uid,
                frame_uid,
                CT_IMAGE,
                "CT",
                ct_size,
                ct_size,
                f"{folder.name}/CT/{s}",
                sink=True,
            )
            ds.InstanceNumber = s + 1
            ds.BurnedInAnnotation = "NO"
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            if previous is not None:
                ref = Dataset()
                ref.ReferencedSOPClassUID = CT_IMAGE
                ref.ReferencedSOPInstanceUID = previous.SOPInstanceUID
                ds.ReferencedImageSequence = Sequence([ref])
                src = Dataset()
                src.ReferencedSOPClassUID = CT_IMAGE
                src.ReferencedSOPInstanceUID = previous.SOPInstanceUID
                ds.SourceImageSequence = Sequence([src])
            syntax = syntaxes[(index + s) % len(syntaxes)]
            if syntax == ExplicitVRBigEndian:
                ds.PixelData = np.frombuffer(ds.PixelData, dtype="<u2").astype(">u2").tobytes()
            b.save(ds, folder / "CT" / f"{name_token}-{s}.dcm", syntax, mrn, risk=False)
            previous = ds
            first_ct = first_ct or ds

        # A large radiograph (CR for even patients, DX for odd ones), deflated for one.
        study2 = b.uid(mrn)
        dx = index % 2 == 1
        ds = b.image(
            patient_id,
            name_token,
            mrn,
            study2,
            b.uid(mrn),
            b.uid(mrn),
            DX_IMAGE if dx else CR_IMAGE,
            "DX" if dx else "CR",
            cr_size,
            cr_size,
            f"{folder.name}/XR",
            sink=False,
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BurnedInAnnotation = "NO"
        syntax = DeflatedExplicitVRLittleEndian if index == 0 else ExplicitVRLittleEndian
        b.save(ds, folder / "XR" / f"{patient_id}.dcm", syntax, mrn, risk=False)

        # A text SR about the CT, with canaries in its content tree.
        if first_ct is not None:
            b.save(
                _report(b, patient_id, name_token, mrn, study_uid, first_ct, folder.name),
                folder / "SR" / "report.dcm",
                ExplicitVRLittleEndian,
                mrn,
                risk=False,
            )

        # An ultrasound with text burned in (flagged), or a secondary capture (flagged).
        if index % 2 == 0:
            us = b.image(
                patient_id,
                name_token,
                mrn,
                study2,
                b.uid(mrn),
                b.uid(mrn),
                US_IMAGE,
                "US",
                120,
                160,
                f"{folder.name}/US",
                sink=False,
            )
            us.BurnedInAnnotation = "YES"
            b.save(us, folder / "US" / "us.dcm", ExplicitVRLittleEndian, mrn, risk=True)
        else:
            sc = b.image(
                patient_id,
                name_token,
                mrn,
                study2,
                b.uid(mrn),
                b.uid(mrn),
                SECONDARY_CAPTURE,
                "OT",
                64,
                64,
                f"{folder.name}/SC",
                sink=False,
            )
            sc.ConversionType = "WSD"
            b.save(sc, folder / "SC" / "sc.dcm", ExplicitVRLittleEndian, mrn, risk=True)
    return corpus


def _report(
    b: CanaryBuilder,
    patient_id: str,
    name_token: str,
    mrn: str,
    study_uid: str,
    image: Dataset,
    folder: str,
) -> Dataset:
    where = f"{folder}/SR"
    ds = Dataset()
    b.patient_module(ds, patient_id, name_token)
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = b.uid(mrn)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = b.uid(mrn)
    ds.Modality = "SR"
    ds.SeriesNumber = 9
    ds.InstanceNumber = 1
    for keyword in (
        "StudyDate",
        "ContentDate",
        "ContentTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "VerifyingObserverName",
    ):
        b.plant(ds, keyword, mrn, where)
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    text = Dataset()
    text.RelationshipType = "CONTAINS"
    text.ValueType = "TEXT"
    text.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    token = b.tokens.text()
    text.TextValue = f"{name_token} {patient_id} seen by Dr {token}: ground-glass opacities."
    b._needle(token.encode(), f"{where}>TextValue")
    observer = Dataset()
    observer.RelationshipType = "HAS OBS CONTEXT"
    observer.ValueType = "PNAME"
    observer.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    b.plant(observer, "PersonName", mrn, f"{where}>Content>PNAME")
    when = Dataset()
    when.RelationshipType = "HAS OBS CONTEXT"
    when.ValueType = "DATETIME"
    when.ConceptNameCodeSequence = Sequence([_code("111526", "DCM", "DateTime Started")])
    b.plant(when, "DateTime", mrn, f"{where}>Content>DATETIME")
    uid_item = Dataset()
    uid_item.RelationshipType = "HAS OBS CONTEXT"
    uid_item.ValueType = "UIDREF"
    uid_item.ConceptNameCodeSequence = Sequence(
        [_code("121018", "DCM", "Procedure Study Instance UID")]
    )
    uid_item.UID = study_uid
    ref_item = Dataset()
    ref_item.RelationshipType = "INFERRED FROM"
    ref_item.ValueType = "IMAGE"
    ref_item.ConceptNameCodeSequence = Sequence(
        [_code("121080", "DCM", "Best illustration of finding")]
    )
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ref_item.ReferencedSOPSequence = Sequence([ref])
    text.ContentSequence = Sequence([ref_item])
    ds.ContentSequence = Sequence([observer, when, uid_item, text])
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
    return ds


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item

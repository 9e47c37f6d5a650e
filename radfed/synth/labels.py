"""Synthetic RICORD-style labels, clinical variables and CT masks for a synthetic site.

Given a corpus from :func:`radfed.synth.site.write_site_corpus`, this writes what a
site's research team would hand the node, keyed by the ORIGINAL identifiers:

* ``labels.csv`` — radiograph labels by accession number, in the spellings
  people use, with a patient-name column and a free-text comment that must be
  dropped, and rows for accession numbers the site does not have;
* ``labels_invalid.csv`` — the same with misspelt values in some cells;
* ``clinical.csv`` / ``clinical_invalid.csv`` — clinical variables by MRN, the
  same way;
* ``segmentations/manifest.csv`` — binary masks (PNG and ``.npy``) of CT slices
  by original SOP Instance UID, with a row for a UID the site does not have and
  a row whose mask is not the slice's size.

The returned :class:`LabelCorpus` holds the truth the tests compare against:
canonical values, original (unshifted) dates, and the rows each file expects
to be unmatched, unparseable or skipped. The same arguments give the same files.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image

from radfed.synth.site import SiteCorpus

APPEARANCE = {
    "Typical Appearance": ["Typical Appearance", "typical", "TYPICAL_APPEARANCE"],
    "Indeterminate Appearance": ["Indeterminate Appearance", "indeterminate"],
    "Atypical Appearance": ["Atypical Appearance", "atypical"],
    "Negative for Pneumonia": ["Negative for Pneumonia", "negative"],
}
AIRSPACE = {
    "none": ["none", "None"],
    "mild": ["mild", "Mild"],
    "moderate": ["moderate", "Moderate", "2"],
    "severe": ["severe", "SEVERE", "3"],
}
YES = ["yes", "Y", "TRUE"]
NO = ["no", "N", "false"]


@dataclass(frozen=True)
class SourceInstance:
    """What the generator read back from one file of the corpus (all original values)."""

    patient_id: str
    patient_name: str
    study_uid: str
    accession: str
    study_date: str
    modality: str
    series_uid: str
    sop_uid: str
    instance_number: int
    rows: int
    columns: int


@dataclass
class LabelCorpus:
    """The files written and the truth they encode (original identifiers, unshifted dates)."""

    root: Path
    labels_csv: Path
    labels_invalid_csv: Path
    clinical_csv: Path
    clinical_invalid_csv: Path
    manifest_csv: Path
    #: Original Study Instance UID -> label name -> canonical value.
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    #: MRN -> variable -> canonical value (dates as YYYY-MM-DD, not shifted).
    clinical: dict[str, dict[str, str]] = field(default_factory=dict)
    #: File name -> row numbers whose key the site does not have.
    unmatched_rows: dict[str, list[int]] = field(default_factory=dict)
    #: File name -> (row, column header) of every deliberately bad cell.
    invalid_cells: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: Original CT Series UID -> segment label -> original SOP Instance UID -> mask.
    segments: dict[str, dict[str, dict[str, npt.NDArray[np.bool_]]]] = field(default_factory=dict)
    #: Manifest rows that must be skipped because the mask is the wrong size.
    wrong_shape_rows: list[int] = field(default_factory=list)


def read_back(corpus: SiteCorpus) -> list[SourceInstance]:
    """The original identifiers of every DICOM file of the corpus, read with pydicom."""
    found = []
    for path in corpus.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found.append(
            SourceInstance(
                patient_id=str(ds.PatientID),
                patient_name=str(ds.PatientName),
                study_uid=str(ds.StudyInstanceUID),
                accession=str(ds.get("AccessionNumber", "")),
                study_date=str(ds.get("StudyDate", "")),
                modality=str(ds.Modality),
                series_uid=str(ds.SeriesInstanceUID),
                sop_uid=str(ds.SOPInstanceUID),
                instance_number=int(ds.get("InstanceNumber") or 0),
                rows=int(ds.get("Rows") or 0),
                columns=int(ds.get("Columns") or 0),
            )
        )
    return found


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _unknown_key(rng: random.Random, prefix: str, taken: set[str]) -> str:
    while True:
        key = f"{prefix}{rng.randrange(10**6, 10**7)}"
        if key not in taken:
            return key


def _date(text: str) -> dt.date:
    return dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))


def write_label_corpus(corpus: SiteCorpus, root: Path, seed: int = 0) -> LabelCorpus:
    """Write labels, clinical variables and CT masks for ``corpus`` under ``root``."""
    rng = random.Random(seed)
    instances = read_back(corpus)
    out = LabelCorpus(
        root=root,
        labels_csv=root / "labels.csv",
        labels_invalid_csv=root / "labels_invalid.csv",
        clinical_csv=root / "clinical.csv",
        clinical_invalid_csv=root / "clinical_invalid.csv",
        manifest_csv=root / "segmentations" / "manifest.csv",
    )
    _labels(out, instances, rng)
    _clinical(out, instances, rng)
    _masks(out, instances, rng)
    return out


def _labels(out: LabelCorpus, instances: list[SourceInstance], rng: random.Random) -> None:
    header = ["Accession Number", "Patient Name", "Appearance", "Airspace Disease", "Comment"]
    radiographs: dict[str, SourceInstance] = {}
    for inst in instances:
        if inst.modality in ("CR", "DX"):
            radiographs.setdefault(inst.study_uid, inst)
    rows: list[list[str]] = []
    for study_uid, inst in sorted(radiographs.items()):
        appearance = rng.choice(sorted(APPEARANCE))
        airspace = rng.choice(sorted(AIRSPACE))
        out.labels[study_uid] = {"appearance": appearance, "airspace_disease": airspace}
        rows.append(
            [
                inst.accession,
                inst.patient_name,
                rng.choice(APPEARANCE[appearance]),
                rng.choice(AIRSPACE[airspace]),
                f"read for {inst.patient_name} ({inst.patient_id})",
            ]
        )
    accessions = {i.accession for i in instances}
    rows.insert(1, [_unknown_key(rng, "ACC", accessions), "DOE^JANE", "typical", "mild", ""])
    out.unmatched_rows["labels.csv"] = [3]
    _write_csv(out.labels_csv, header, rows)
    bad = [list(r) for r in rows]
    bad[0][2] = "Typcal Apperance"
    bad[-1][3] = "very bad"
    out.invalid_cells["labels_invalid.csv"] = [
        (2, "Appearance"),
        (len(rows) + 1, "Airspace Disease"),
    ]
    out.unmatched_rows["labels_invalid.csv"] = [3]
    _write_csv(out.labels_invalid_csv, header, bad)


def _clinical(out: LabelCorpus, instances: list[SourceInstance], rng: random.Random) -> None:
    header = [
        "MRN",
        "Patient Name",
        "Date of Birth",
        "Age",
        "Sex",
        "COVID Test Result",
        "COVID Test Date",
        "Admitted",
        "ICU",
        "Intubated",
        "Death",
        "Days to Outcome",
        "Notes",
    ]
    patients: dict[str, SourceInstance] = {}
    for inst in sorted(instances, key=lambda i: i.study_date):
        patients.setdefault(inst.patient_id, inst)
    rows: list[list[str]] = []
    for mrn, inst in sorted(patients.items()):
        ds_age = rng.randrange(30, 85)
        sex = rng.choice(["M", "F"])
        positive = rng.random() < 0.7
        test_date = _date(inst.study_date) - dt.timedelta(days=rng.randrange(0, 5))
        admitted, icu = rng.random() < 0.6, rng.random() < 0.3
        intubated, death = icu and rng.random() < 0.5, rng.random() < 0.1
        days = rng.randrange(1, 40)
        out.clinical[mrn] = {
            "age": str(ds_age),
            "sex": sex,
            "covid_test_result": "positive" if positive else "negative",
            "covid_test_date": test_date.isoformat(),
            "admitted": "yes" if admitted else "no",
            "icu": "yes" if icu else "no",
            "intubated": "yes" if intubated else "no",
            "death": "yes" if death else "no",
            "days_to_outcome": str(days),
        }
        rows.append(
            [
                mrn,
                inst.patient_name,
                "19600101",
                rng.choice([str(ds_age), f"{ds_age:03d}Y"]),
                rng.choice({"M": ["M", "male"], "F": ["F", "Female"]}[sex]),
                rng.choice(["Positive", "pos"] if positive else ["Negative", "neg"]),
                rng.choice([test_date.isoformat(), test_date.strftime("%Y%m%d")]),
                rng.choice(YES if admitted else NO),
                rng.choice(YES if icu else NO),
                rng.choice(YES if intubated else NO),
                rng.choice(YES if death else NO),
                rng.choice([str(days), f"{days}.0"]),
                f"{inst.patient_name} called back on {inst.study_date}",
            ]
        )
    mrns = {i.patient_id for i in instances}
    unknown = _unknown_key(rng, "MRN", mrns)
    unmatched = [unknown, "ROE^RICHARD", "19700101", "41", "M", "negative", "2020-04-01"]
    rows.append([*unmatched, "no", "no", "no", "no", "3", ""])
    out.unmatched_rows["clinical.csv"] = [len(rows) + 1]
    _write_csv(out.clinical_csv, header, rows)
    bad = [list(r) for r in rows]
    bad[0][3] = "forty"
    bad[0][6] = "03/04/2020"
    bad[-2][4] = "X"
    out.invalid_cells["clinical_invalid.csv"] = [
        (2, "Age"),
        (2, "COVID Test Date"),
        (len(rows), "Sex"),
    ]
    out.unmatched_rows["clinical_invalid.csv"] = [len(rows) + 1]
    _write_csv(out.clinical_invalid_csv, header, bad)


def _disc(rows: int, columns: int, cy: float, cx: float, radius: float) -> npt.NDArray[np.bool_]:
    y, x = np.ogrid[:rows, :columns]
    disc: npt.NDArray[np.bool_] = (y - cy) ** 2 + (x - cx) ** 2 <= radius**2
    return disc


def _masks(out: LabelCorpus, instances: list[SourceInstance], rng: random.Random) -> None:
    folder = out.manifest_csv.parent
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows: list[list[str]] = []
    series: dict[str, list[SourceInstance]] = {}
    for inst in instances:
        if inst.modality == "CT":
            series.setdefault(inst.series_uid, []).append(inst)
    for s, (series_uid, slices) in enumerate(sorted(series.items())):
        slices.sort(key=lambda i: i.instance_number)
        truth = out.segments.setdefault(series_uid, {})
        for k, inst in enumerate(slices[:2]):
            h, w = inst.rows, inst.columns
            lung = _disc(h, w, h / 2, w / 2, min(h, w) * rng.uniform(0.3, 0.45))
            truth.setdefault("Lung", {})[inst.sop_uid] = lung
            name = f"masks/s{s}_i{k}_lung"
            if k == 0:
                Image.fromarray(lung.astype(np.uint8) * 255, mode="L").save(folder / f"{name}.png")
                rows.append([inst.sop_uid, f"{name}.png", "Lung"])
            else:
                np.save(folder / f"{name}.npy", lung)
                rows.append([inst.sop_uid, f"{name}.npy", "lungs"])
            if k == 1:
                ggo = lung & _disc(h, w, h / 3, w / 3, min(h, w) / 8)
                truth.setdefault("Ground-glass opacity", {})[inst.sop_uid] = ggo
                Image.fromarray(ggo.astype(np.uint8), mode="L").save(folder / f"{name}_ggo.png")
                rows.append([inst.sop_uid, f"{name}_ggo.png", "GGO"])
        small = np.zeros((slices[0].rows // 2, slices[0].columns // 2), np.uint8)
        np.save(folder / f"masks/s{s}_wrong_shape.npy", small)
        rows.append([slices[-1].sop_uid, f"masks/s{s}_wrong_shape.npy", "Consolidation"])
        out.wrong_shape_rows.append(len(rows) + 1)
    known = {i.sop_uid for i in instances}
    unknown = f"1.2.826.0.1.3680043.10.1043.999.{rng.randrange(10**6)}"
    while unknown in known:
        unknown += "1"
    np.save(folder / "masks/unknown.npy", np.zeros((8, 8), bool))
    rows.append([unknown, "masks/unknown.npy", "Lung"])
    out.unmatched_rows["manifest.csv"] = [len(rows) + 1]
    _write_csv(out.manifest_csv, ["sop_instance_uid", "mask", "label", "reader"], rows)

"""Segmentation masks of original CT slices -> one DICOM SEG per de-identified series.

The manifest is a CSV with ``sop_instance_uid`` (the ORIGINAL SOP Instance UID
of a slice), ``mask`` (a binary PNG or ``.npy`` of the slice's size, relative to
the manifest) and ``label`` (a segment label of ``schema.SEGMENT_LABELS``).
Original UIDs are joined to de-identified instances by one audited vault read;
the SEG is then built by highdicom from the de-identified instances in the node
store, so it references their UIDs and copies their patient and study modules
(pseudonym, shifted dates) and nothing else. Its UIDs are derived from the
source series UID and the label set, and its bytes from nothing that changes
between runs, so importing the same manifest again finds the same file.

Rows whose UID matches no de-identified image, whose mask is not binary or not
the slice's size, or whose label is unknown are reported and skipped; a
manifest that cannot be read writes nothing. A SEG whose UIDs exist in the
store with other content (masks changed since the last import) is reported as a
conflict and nothing is overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import secrets
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, SegmentationStorage
from sqlalchemy import select

from node.annotations import schema
from node.annotations.csvfile import Table, read_table
from node.annotations.lookup import match_instances
from node.annotations.report import (
    Ignored,
    ImportReport,
    StoredObject,
    Unmatched,
    Unparseable,
)
from node.deid.engine import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from node.deid.runner import TMP_DIR, FileOutcome, InstanceInfo, fsync_dir
from node.deid.values import dummy
from node.errors import NodeError
from node.index import audit
from node.index.models import ImportRun, Instance, Patient, Series, Study
from node.index.store import VIA_ANNOTATION, NodeIndex
from node.settings import NodeSettings
from protocols.version import SOFTWARE_VERSION

log = logging.getLogger(__name__)

KEY = "sop_instance_uid"
COLUMNS = (KEY, "mask", "label")
PURPOSE = "segmentation import: match SOP Instance UIDs"
MANUFACTURER = "RadFed"
MODEL = "radfed-node"
CONTENT_LABEL = "RADFED_SEG"
SERIES_NUMBER_OFFSET = 1000
#: Date and time given to a SEG whose source has none (the site removes dates).
NO_DATE = ("19000101", "000000")

Mask = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class _Row:
    row: int
    original_uid: str
    label: schema.SegmentLabel
    mask: Path


@dataclass(frozen=True)
class _Target:
    """A de-identified image a manifest row points to."""

    sop_uid: str
    rows: int | None
    columns: int | None
    frames: int | None
    modality: str | None
    series_id: int
    series_uid: str
    series_number: int | None
    study_uid: str
    pseudonym: str


def import_segmentations(
    index: NodeIndex, settings: NodeSettings, manifest: Path, actor: str
) -> ImportReport:
    """Build, store and index one DICOM SEG per de-identified series the manifest covers."""
    table = read_table(manifest, "manifest")
    missing = [c for c in COLUMNS if table.column(c) is None]
    if missing:
        raise NodeError(
            "manifest_columns",
            f'Argument "manifest": the header must name the columns {", ".join(COLUMNS)} '
            f"(missing: {', '.join(missing)}).",
        )
    report = ImportReport(kind="segmentations", key=KEY, rows=len(table.rows))
    report.ignored_columns = [
        Ignored(h, "not a manifest column: dropped")
        for h, k in zip(table.headers, table.keys, strict=True)
        if k not in COLUMNS
    ]
    rows = _parse_rows(table, manifest.parent.resolve(), report)
    uid_map = match_instances(index, (r.original_uid for r in rows), actor, PURPOSE)
    targets = _targets(index, uid_map.values())
    # de-identified series -> label -> de-identified SOP Instance UID -> mask
    grouped: dict[str, dict[str, dict[str, Mask]]] = {}
    series_of: dict[str, _Target] = {}
    rows_of: dict[str, list[int]] = {}
    for row in rows:
        target = targets.get(uid_map.get(row.original_uid, ""))
        if target is None:
            report.unmatched.append(
                Unmatched(row.row, KEY, "matches no de-identified instance on this node")
            )
            continue
        report.matched += 1
        try:
            mask = _mask_for(row.mask, target)
        except ValueError as exc:
            column = exc.column if isinstance(exc, _CellError) else "mask"
            report.unparseable.append(Unparseable(row.row, column, str(exc)))
            continue
        by_label = grouped.setdefault(target.series_uid, {}).setdefault(row.label.label, {})
        earlier = by_label.get(target.sop_uid)
        by_label[target.sop_uid] = mask if earlier is None else earlier | mask
        series_of[target.series_uid] = target
        rows_of.setdefault(target.series_uid, []).append(row.row)
        report.values += 1
    outcomes: list[FileOutcome] = []
    for series_uid in sorted(grouped):
        try:
            stored, outcome = _store(index, settings, series_of[series_uid], grouped[series_uid])
        except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError) as exc:
            # A store file gone or unreadable, or geometry highdicom refuses: this series
            # gets no SEG, the others go on.
            log.warning("no SEG for series %s: %s", series_uid, exc)
            reason = f"no SEG could be built for the image's series ({type(exc).__name__})"
            report.values -= len(rows_of[series_uid])
            report.unparseable.extend(Unparseable(r, KEY, reason) for r in rows_of[series_uid])
            continue
        report.objects.append(stored)
        if outcome is not None:
            outcomes.append(outcome)
    report.unparseable.sort(key=lambda p: (p.row, p.column))
    if outcomes:
        index.record(outcomes, via=VIA_ANNOTATION, actor=actor)
    report.applied = bool(outcomes)
    report.studies = len(
        {series_of[o.source_series].study_uid for o in report.objects if o.status != "conflict"}
    )
    _log_run(index, actor, report, table)
    log.info(
        "segmentation import: %d rows, %d matched, %d unmatched, %d unparseable, %d SEG (%s)",
        report.rows,
        report.matched,
        len(report.unmatched),
        len(report.unparseable),
        len(report.objects),
        ", ".join(o.status for o in report.objects) or "none",
    )
    return report


class _CellError(ValueError):
    """A row's problem, naming its column."""

    def __init__(self, column: str, reason: str) -> None:
        super().__init__(reason)
        self.column = column


def _parse_rows(table: Table, base: Path, report: ImportReport) -> list[_Row]:
    key_at, mask_at, label_at = (table.column(c) for c in COLUMNS)
    if key_at is None or mask_at is None or label_at is None:  # checked by the caller
        return []
    rows: list[_Row] = []
    for number, cells in table.rows:

        def cell(at: int, cells: list[str] = cells) -> str:
            return cells[at].strip() if at < len(cells) else ""

        uid = cell(key_at)
        if not uid:
            report.unmatched.append(Unmatched(number, KEY, "empty key"))
            continue
        label = schema.segment_label(cell(label_at))
        if label is None:
            known = ", ".join(s.label for s in schema.SEGMENT_LABELS)
            report.unparseable.append(Unparseable(number, "label", f"not one of: {known}"))
            continue
        try:
            path = _mask_path(base, cell(mask_at))
        except ValueError as exc:
            report.unparseable.append(Unparseable(number, "mask", str(exc)))
            continue
        rows.append(_Row(number, uid, label, path))
    return rows


def _mask_path(base: Path, text: str) -> Path:
    """The mask file a cell names, which must lie under the manifest's folder."""
    if not text:
        raise ValueError("empty")
    given = Path(text)
    if given.is_absolute():
        raise ValueError("an absolute path: give it relative to the manifest")
    resolved = (base / given).resolve()
    if not resolved.is_relative_to(base):
        raise ValueError("outside the manifest's folder")
    return resolved


def _targets(index: NodeIndex, sop_uids: Iterable[str]) -> dict[str, _Target]:
    wanted = sorted(set(sop_uids))
    found: dict[str, _Target] = {}
    with index.db.read() as session:
        for start in range(0, len(wanted), 400):
            statement = (
                select(
                    Instance.sop_uid,
                    Instance.rows,
                    Instance.columns,
                    Instance.number_of_frames,
                    Series.modality,
                    Series.id,
                    Series.series_uid,
                    Series.series_number,
                    Study.study_uid,
                    Patient.pseudonym,
                )
                .join(Series, Series.id == Instance.series_id)
                .join(Study, Study.id == Instance.study_id)
                .join(Patient, Patient.id == Study.patient_id)
                .where(Instance.sop_uid.in_(wanted[start : start + 400]))
            )
            for (
                sop,
                rows,
                columns,
                frames,
                modality,
                sid,
                suid,
                number,
                study,
                name,
            ) in session.execute(statement):
                found[sop] = _Target(
                    sop, rows, columns, frames, modality, sid, suid, number, study, name
                )
    return found


def _mask_for(path: Path, target: _Target) -> Mask:
    """The row's mask, checked against the image it segments."""
    if target.modality == "SEG" or not target.rows or not target.columns:
        raise _CellError(KEY, "not an image")
    if (target.frames or 1) > 1:
        raise _CellError(KEY, "a multi-frame image: masks are per single-frame slice")
    array = _load_mask(path)
    if array.shape != (target.rows, target.columns):
        shape = "x".join(str(n) for n in array.shape)
        raise ValueError(f"a {shape} mask for a {target.rows}x{target.columns} image")
    return _binary(array)


def _load_mask(path: Path) -> npt.NDArray[Any]:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array: npt.NDArray[Any] = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            raise ValueError("not a readable .npy array") from None
        return array
    if suffix == ".png":
        try:
            with Image.open(path, formats=["PNG"]) as image:
                if image.mode not in ("1", "L", "I", "I;16"):
                    raise ValueError(f"a {image.mode} PNG: give a single-channel image")
                return np.asarray(image)
        except (OSError, Image.DecompressionBombError):
            raise ValueError("not a readable PNG image") from None
    raise ValueError("not a .png or .npy file")


def _binary(array: npt.NDArray[Any]) -> Mask:
    if array.dtype.kind not in "biuf":
        raise ValueError("not a numeric array")
    levels = np.unique(np.asarray(array))
    if levels.dtype.kind == "f" and np.isnan(levels).any():
        raise ValueError("holds NaN")
    if levels.size > 2 or (levels.size == 2 and levels[0] != 0):
        raise ValueError("not binary: give 0 for background and one value for the segment")
    mask: Mask = np.asarray(array) != 0
    return mask


def _uid(purpose: str, series_uid: str, labels: list[str]) -> str:
    """A ``2.25`` UID derived from the source series and the label set (stable across runs)."""
    digest = hashlib.sha256(
        "\x00".join(["radfed-seg", purpose, series_uid, *labels]).encode("utf-8")
    ).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _source_images(index: NodeIndex, settings: NodeSettings, target: _Target) -> list[Dataset]:
    """The de-identified instances of the series, headers only, in instance order."""
    with index.db.read() as session:
        paths = list(
            session.scalars(select(Instance.path).where(Instance.series_id == target.series_id))
        )
    images: list[Dataset] = [
        pydicom.dcmread(settings.store_dir / p, stop_before_pixels=True) for p in paths
    ]
    images.sort(key=lambda ds: (int(ds.get("InstanceNumber") or 0), str(ds.SOPInstanceUID)))
    return images


def _build(
    images: list[Dataset], target: _Target, masks: dict[str, dict[str, Mask]]
) -> hd.seg.Segmentation:
    """The SEG of one series: one segment per label, frames only where a mask is given."""
    labels = [s for s in schema.SEGMENT_LABELS if s.label in masks]
    names = [s.label for s in labels]
    masked_uids = {uid for by_sop in masks.values() for uid in by_sop}
    sources = [ds for ds in images if ds.SOPInstanceUID in masked_uids]
    further = [ds for ds in images if ds.SOPInstanceUID not in masked_uids]
    pixels = np.zeros(
        (len(sources), int(target.rows or 0), int(target.columns or 0), len(labels)), bool
    )
    for i, ds in enumerate(sources):
        for j, label in enumerate(labels):
            mask = masks[label.label].get(ds.SOPInstanceUID)
            if mask is not None:
                pixels[i, :, :, j] = mask
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=label.label,
            segmented_property_category=_code(label.category),
            segmented_property_type=_code(label.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for n, label in enumerate(labels, start=1)
    ]
    first = sources[0]
    date = str(first.get("StudyDate") or "") or NO_DATE[0]
    time = str(first.get("StudyTime") or "") or NO_DATE[1]
    with warnings.catch_warnings():
        # The pseudonym is a one-component Patient's Name; highdicom warns about that.
        warnings.filterwarnings("ignore", message=r".*person name.*", category=UserWarning)
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=_uid("series", target.series_uid, names),
            series_number=min(SERIES_NUMBER_OFFSET + (target.series_number or 0), 2**31 - 1),
            sop_instance_uid=_uid("instance", target.series_uid, names),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MODEL,
            software_versions=SOFTWARE_VERSION,
            device_serial_number="0",
            content_label=CONTENT_LABEL,
            content_description="Expert segmentation",
            series_description=f"Segmentation: {', '.join(names)}"[:64],
            further_source_images=further or None,
            content_date=date,
            content_time=time,
        )
    _make_reproducible(seg, _uid("dimension", target.series_uid, names))
    _conform_to_profile(seg, first)
    return seg


#: What the source images' de-identification record says; the SEG says the same.
_DEID_RECORD = (
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "LongitudinalTemporalInformationModified",
)


def _conform_to_profile(seg: Dataset, source: Dataset) -> None:
    """Hold the SEG to the rules every de-identified object on this node meets.

    highdicom writes attributes the de-identification profile removes, empties or
    replaces (descriptions, contributing equipment, dimension labels, its own
    implementation UID) and none of the de-identification record. None of them
    carries PHI here, but the node's PHI scan judges every object by the same
    rules: left as they are, a study with masks is held at every scan and can
    never be shared. Optional (type 3) ones go; type 2 ones are emptied; the
    device serial number (type 1) gets the profile's dummy value.
    """
    for keyword in ("SeriesDescription", "ContributingEquipmentSequence", "SegmentsOverlap"):
        if keyword in seg:
            delattr(seg, keyword)
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionDescriptionLabel" in item:
            del item.DimensionDescriptionLabel
    seg.ContentDescription = ""
    seg.DeviceSerialNumber = dummy("LO").decode("ascii").strip()
    for keyword in _DEID_RECORD:
        if keyword in source:
            seg[keyword] = copy.deepcopy(source[keyword])
    seg.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID.decode("ascii"))
    seg.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME.decode("ascii")


def _code(coded: schema.Coded) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(coded.value, coded.scheme, coded.meaning)


def _make_reproducible(seg: Dataset, dimension_uid: str) -> None:
    """Drop what highdicom stamps with the clock or a random UID, so a rebuild is identical.

    The creation and contribution times are optional (type 3) and would tell the
    real date beside the shifted ones; the dimension organisation UID only has to
    be unique to this object.
    """
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in seg:
            delattr(seg, keyword)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            del item.ContributionDateTime
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            item.DimensionOrganizationUID = dimension_uid


def _store(
    index: NodeIndex,
    settings: NodeSettings,
    target: _Target,
    masks: dict[str, dict[str, Mask]],
) -> tuple[StoredObject, FileOutcome | None]:
    images = _source_images(index, settings, target)
    seg = _build(images, target, masks)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, seg, enforce_file_format=True)
    data = buffer.getvalue()
    relpath = (
        f"{target.pseudonym}/{target.study_uid}/{seg.SeriesInstanceUID}/{seg.SOPInstanceUID}.dcm"
    )
    status = _publish(settings.store_dir, relpath, data)
    stored = StoredObject(
        source_series=target.series_uid,
        series_instance_uid=str(seg.SeriesInstanceUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segments=[s.label for s in schema.SEGMENT_LABELS if s.label in masks],
        frames=int(seg.NumberOfFrames),
        status=status,
        path=relpath,
    )
    if status == "conflict":
        log.warning(
            "SEG %s exists with other content (masks changed?): nothing overwritten",
            seg.SOPInstanceUID,
        )
        return stored, None
    info = InstanceInfo(
        sop_instance_uid=str(seg.SOPInstanceUID),
        study_instance_uid=target.study_uid,
        series_instance_uid=str(seg.SeriesInstanceUID),
        pseudonym=target.pseudonym,
        sop_class_uid=SegmentationStorage,
        transfer_syntax=ExplicitVRLittleEndian,
        sha256=hashlib.sha256(data).hexdigest(),
        attributes={
            "modality": "SEG",
            "study_date": str(seg.get("StudyDate") or "") or None,
            "manufacturer": MANUFACTURER,
            "model": MODEL,
            "series_number": int(seg.SeriesNumber),
            "instance_number": 1,
            "rows": int(seg.Rows),
            "columns": int(seg.Columns),
            "number_of_frames": int(seg.NumberOfFrames),
            "photometric": str(seg.PhotometricInterpretation),
        },
    )
    outcome = FileOutcome(
        source=f"annotation:{info.sop_instance_uid}",
        status=status,
        output=relpath,
        bytes_out=len(data),
        instance=info,
    )
    return stored, outcome


def _publish(store: Path, relpath: str, data: bytes) -> str:
    """Write ``data`` at ``store/relpath`` whole or not at all: written, unchanged or conflict."""
    final = store / relpath
    created = [p for p in reversed(final.parents) if p.is_relative_to(store) and not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    for folder in created:
        fsync_dir(folder.parent)
    scratch = store / TMP_DIR / str(os.getpid())
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = scratch / f"{os.getpid()}-{secrets.token_hex(8)}.part"
    try:
        with tmp.open("xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            return "unchanged" if final.read_bytes() == data else "conflict"
        fsync_dir(final.parent)
        return "written"
    finally:
        tmp.unlink(missing_ok=True)


def _log_run(index: NodeIndex, actor: str, report: ImportReport, table: Table) -> None:
    """The import's ``ImportRun`` (when something was stored) and its audit entry."""
    details = {
        "rows": report.rows,
        "matched": report.matched,
        "unmatched": len(report.unmatched),
        "unparseable": len(report.unparseable),
        "objects": {o.sop_instance_uid: o.status for o in report.objects},
        "file_sha256": table.sha256,
    }
    with index.db.write() as session:
        subject = "nothing stored"
        if report.applied:
            run = ImportRun(kind=report.kind, actor=actor, rows=report.rows, matched=report.matched)
            session.add(run)
            session.flush()
            report.import_id = run.id
            run.report = report.to_json()
            subject = f"import:{run.id}"
        audit.append(session, actor, "segmentations.import", subject, **details)

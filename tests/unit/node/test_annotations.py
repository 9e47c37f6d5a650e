"""Label, clinical-variable and segmentation imports: a synthetic site taken into a real node."""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from sqlalchemy import func, select

from node.annotations import schema
from node.annotations.importer import import_clinical, import_labels
from node.annotations.report import ImportReport
from node.annotations.seg import import_segmentations
from node.annotations.values import parse
from node.deid import keys
from node.errors import NodeError
from node.index import audit
from node.index.models import AuditEntry, ClinicalValue, ImportRun, Instance, Label, Study
from node.index.originals import original_identifiers
from node.index.store import NodeIndex, StudyQuery
from node.intake.ingest import ingest
from node.settings import NodeSettings, load_settings
from node.site import engine_config, open_index
from protocols.deid.options import DeidOptions
from protocols.phi.scanner import scan
from radfed.synth.labels import LabelCorpus, SourceInstance, read_back, write_label_corpus
from radfed.synth.site import write_site_corpus
from tests.helpers import CountingAESGCM

DCIODVFY = Path("/usr/bin/dciodvfy")


@dataclass
class Site:
    """A node home with a synthetic site taken in, and the site's label files."""

    settings: NodeSettings
    index: NodeIndex
    originals: list[SourceInstance]
    files: LabelCorpus
    #: Original Study Instance UID -> (de-identified Study Instance UID, date shift in days).
    studies: dict[str, tuple[str, int]]
    #: Original SOP Instance UID -> de-identified SOP Instance UID.
    sops: dict[str, str]

    def labels(self) -> dict[str, dict[str, str]]:
        """De-identified Study Instance UID -> label name -> value, as stored."""
        with self.index.db.read() as session:
            rows = session.execute(
                select(Study.study_uid, Label.scheme, Label.name, Label.value).join(
                    Study, Study.id == Label.study_id
                )
            ).all()
        out: dict[str, dict[str, str]] = {}
        for study, scheme, name, value in rows:
            assert scheme == "ricord"
            out.setdefault(study, {})[name] = value
        return out

    def clinical(self) -> dict[str, dict[str, str]]:
        """De-identified Study Instance UID -> variable -> value, as stored."""
        with self.index.db.read() as session:
            rows = session.execute(
                select(Study.study_uid, ClinicalValue.variable, ClinicalValue.value).join(
                    Study, Study.id == ClinicalValue.study_id
                )
            ).all()
        out: dict[str, dict[str, str]] = {}
        for study, variable, value in rows:
            out.setdefault(study, {})[variable] = value
        return out

    def count(self, table: type[Label] | type[ClinicalValue] | type[ImportRun]) -> int:
        with self.index.db.read() as session:
            return session.scalar(select(func.count()).select_from(table)) or 0

    def audit_actions(self) -> list[tuple[str, str, dict[str, object]]]:
        with self.index.db.read() as session:
            return [
                (e.action, e.subject, json.loads(e.details))
                for e in session.scalars(select(AuditEntry).order_by(AuditEntry.seq))
            ]

    def phi(self) -> set[str]:
        """Every original identifier planted in the site's files and sheets."""
        found = set()
        for inst in self.originals:
            found |= {inst.patient_id, inst.accession, inst.study_uid, inst.series_uid}
            found |= {inst.sop_uid, inst.patient_name, inst.patient_name.split("^")[0]}
        return {f for f in found if f}


@pytest.fixture
def site(tmp_path: Path) -> Site:
    corpus = write_site_corpus(tmp_path / "export", patients=2, ct_slices=3, ct_size=32, cr_size=32)
    files = write_label_corpus(corpus, tmp_path / "sheets")
    settings = load_settings(tmp_path / "home")
    index = open_index(settings)
    ingest(
        [corpus.root],
        settings,
        index,
        engine_config(settings),
        1,
        settings.runs_dir / "test.jsonl",
    )
    studies: dict[str, tuple[str, int]] = {}
    sops: dict[str, str] = {}
    for entry in index.vault.entries():  # the test's own view of the map, outside the node
        original, new = entry["study_instance_uid"]
        studies[original] = (new, entry["date_shift_days"])
        sops[entry["sop_instance_uid"][0]] = entry["sop_instance_uid"][1]
    return Site(settings, index, read_back(corpus), files, studies, sops)


def write_rows(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def expected_clinical(site: Site) -> dict[str, dict[str, str]]:
    """What the clinical sheet must store: per de-identified study, dates shifted."""
    out: dict[str, dict[str, str]] = {}
    for inst in site.originals:
        truth = site.files.clinical[inst.patient_id]
        study, shift = site.studies[inst.study_uid]
        shifted = dt.date.fromisoformat(truth["covid_test_date"]) + dt.timedelta(days=shift)
        out[study] = {**truth, "covid_test_date": shifted.isoformat()}
    return out


# -- labels and clinical values ----------------------------------------------------------


def test_labels_land_on_the_pseudonymous_studies(site: Site) -> None:
    # Prepare
    expected = {site.studies[orig][0]: v for orig, v in site.files.labels.items()}

    # Execute
    report = import_labels(site.index, site.files.labels_csv, "operator")

    # Assert
    assert report.applied
    assert (report.kind, report.key, report.rows, report.matched) == (
        "labels",
        "accession_number",
        3,
        2,
    )
    assert [(u.row, u.key) for u in report.unmatched] == [(3, "accession_number")]
    assert report.unparseable == []
    assert {(c.column, c.reason.split(":")[0]) for c in report.ignored_columns} == {
        ("Patient Name", "identifier"),
        ("Comment", "free text"),
    }
    assert site.labels() == expected
    for study, names in expected.items():  # what the API's study detail shows
        detail = site.index.study(study)
        assert {(lab.scheme, lab.name, lab.value) for lab in detail.labels} == {
            ("ricord", name, value) for name, value in names.items()
        }
    with site.index.db.read() as session:
        run = session.scalars(select(ImportRun)).one()
        stored = (run.id, run.kind, run.actor, run.rows, run.matched, json.loads(run.report))
    assert stored == (report.import_id, "labels", "operator", 3, 2, report.as_dict())


def test_clinical_values_apply_to_every_study_of_the_patient_dates_shifted(site: Site) -> None:
    # Prepare
    expected = expected_clinical(site)
    shifts = {shift for _, shift in site.studies.values()}

    # Execute
    report = import_clinical(site.index, site.files.clinical_csv, "operator")

    # Assert
    assert report.applied
    assert (report.key, report.rows, report.matched, report.studies) == ("mrn", 3, 2, 4)
    assert [(u.row, u.key) for u in report.unmatched] == [(4, "mrn")]
    assert {c.column for c in report.ignored_columns} == {"Patient Name", "Date of Birth", "Notes"}
    assert site.clinical() == expected
    assert {study: site.index.study(study).clinical for study in expected} == expected
    assert all(shift < 0 for shift in shifts)  # dates really moved
    # The shift is the one the images got: the study date moved by the same days.
    for inst in site.originals:
        study, shift = site.studies[inst.study_uid]
        detail = site.index.study(study)
        date = inst.study_date
        original = dt.date(int(date[:4]), int(date[4:6]), int(date[6:]))
        assert detail.study_date == original + dt.timedelta(days=shift)


def test_no_original_identifier_is_stored_or_logged(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare
    caplog.set_level(logging.DEBUG)

    # Execute
    reports = [
        import_labels(site.index, site.files.labels_csv, "operator"),
        import_clinical(site.index, site.files.clinical_csv, "operator"),
        import_labels(site.index, site.files.labels_invalid_csv, "operator"),
        import_clinical(site.index, site.files.clinical_invalid_csv, "operator"),
    ]

    # Assert
    site.index.db.close()
    db = site.settings.index_path
    dump = "\n".join(sqlite3.connect(db).iterdump())
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    texts = [dump, caplog.text, *(r.to_json() for r in reports)]
    sheets = [
        row[:2]  # the key and the patient name of every row, matched or not
        for sheet in (site.files.labels_csv, site.files.clinical_csv)
        for row in list(csv.reader(sheet.open()))[1:]
    ]
    for value in site.phi() | {cell for row in sheets for cell in row}:
        assert all(value not in text for text in texts), value
        assert value.encode() not in raw, value


def test_an_unparseable_value_writes_nothing(site: Site) -> None:
    # Prepare
    audited = len(site.audit_actions())

    # Execute
    labels = import_labels(site.index, site.files.labels_invalid_csv, "operator")
    clinical = import_clinical(site.index, site.files.clinical_invalid_csv, "operator")

    # Assert
    for report, name in ((labels, "labels_invalid.csv"), (clinical, "clinical_invalid.csv")):
        assert not report.applied and report.import_id is None
        assert [(p.row, p.column) for p in report.unparseable] == site.files.invalid_cells[name]
        assert [u.row for u in report.unmatched] == site.files.unmatched_rows[name]
    assert site.count(Label) == site.count(ClinicalValue) == site.count(ImportRun) == 0
    actions = site.audit_actions()[audited:]
    assert [(a, s) for a, s, _ in actions] == [
        ("originals.read", "vault"),
        ("labels.import", "rejected"),
        ("originals.read", "vault"),
        ("clinical.import", "rejected"),
    ]
    assert actions[1][2]["unparseable"] == 2 and actions[1][2]["applied"] is False


def test_reimport_is_idempotent_and_replaces_what_a_file_gives(site: Site) -> None:
    # Prepare
    first = import_labels(site.index, site.files.labels_csv, "operator")
    import_clinical(site.index, site.files.clinical_csv, "operator")
    labels, clinical = site.labels(), site.clinical()

    # Execute
    again = import_labels(site.index, site.files.labels_csv, "operator")
    import_clinical(site.index, site.files.clinical_csv, "operator")

    # Assert
    assert (site.labels(), site.clinical()) == (labels, clinical)
    assert site.count(Label) == 4 and site.count(ClinicalValue) == 36
    assert again.import_id != first.import_id
    with site.index.db.read() as session:
        assert set(session.scalars(select(Label.import_id))) == {again.import_id}

    # Execute: a corrected sheet for one study, one column
    rows = list(csv.reader(site.files.labels_csv.open()))
    changed = write_rows(
        site.files.root / "fix.csv",
        [["accession_number", "appearance"], [rows[1][0], "Atypical Appearance"]],
    )
    fixed = import_labels(site.index, changed, "operator")

    # Assert: that value changed, the rest stayed
    study = next(s for s, v in site.labels().items() if v != labels[s])
    assert fixed.values == 1
    assert site.labels()[study] == {**labels[study], "appearance": "Atypical Appearance"}
    assert site.count(Label) == 4


def test_each_import_audits_one_vault_read_and_the_chain_holds(site: Site) -> None:
    # Prepare
    before = site.audit_actions()

    # Execute
    labels = import_labels(site.index, site.files.labels_csv, "alice")
    clinical = import_clinical(site.index, site.files.clinical_csv, "bob")

    # Assert
    added = site.audit_actions()[len(before) :]
    assert [(a, s) for a, s, _ in added] == [
        ("originals.read", "vault"),
        ("labels.import", f"import:{labels.import_id}"),
        ("originals.read", "vault"),
        ("clinical.import", f"import:{clinical.import_id}"),
    ]
    read = added[0][2]
    assert str(read["purpose"]).startswith("label import") and read["key"] == "accession_number"
    assert read["keys"] == 3  # how many keys were asked, never which
    assert added[3][2]["values"] == 36 and added[3][2]["applied"] is True
    with site.index.db.read() as session:
        assert audit.verify(session).ok


def test_labels_keyed_by_mrn_need_a_patient_with_one_study(site: Site) -> None:
    # Prepare: every synthetic patient has a CT and a radiograph study
    mrn = site.originals[0].patient_id
    sheet = write_rows(site.files.root / "by_mrn.csv", [["MRN", "appearance"], [mrn, "typical"]])

    # Execute
    report = import_labels(site.index, sheet, "operator")

    # Assert
    assert report.applied and report.matched == 0
    assert [(u.row, u.key) for u in report.unmatched] == [(2, "mrn")]
    assert "2 studies" in report.unmatched[0].reason
    assert mrn not in report.to_json()
    assert site.count(Label) == 0


def test_the_site_options_decide_dates_and_characteristics(site: Site) -> None:
    # Prepare
    removed = DeidOptions(
        retain_patient_characteristics=False, retain_longitudinal_modified_dates=False
    )
    full = DeidOptions(
        retain_longitudinal_modified_dates=False, retain_longitudinal_full_dates=True
    )

    # Execute
    dropped = import_clinical(site.index, site.files.clinical_csv, "operator", removed)
    stored = site.clinical()

    # Assert
    assert {c.column for c in dropped.ignored_columns if c.reason.startswith("removed")} == {
        "Age",
        "Sex",
        "COVID Test Date",
    }
    assert all(not {"age", "sex", "covid_test_date"} & set(v) for v in stored.values())

    # Execute
    import_clinical(site.index, site.files.clinical_csv, "operator", full)

    # Assert: full dates are kept as they are
    for inst in site.originals:
        study = site.studies[inst.study_uid][0]
        truth = site.files.clinical[inst.patient_id]["covid_test_date"]
        assert site.clinical()[study]["covid_test_date"] == truth


@pytest.mark.parametrize(
    ("rows", "code"),
    [
        ([["accession_number", "mrn", "appearance"], ["A", "M", "typical"]], "csv_key"),
        ([["patient", "appearance"], ["A", "typical"]], "csv_key"),
        ([["accession_number", "comment"], ["A", "x"]], "csv_columns"),
        ([["accession_number", "appearance", "Appearance"], ["A", "typical", "x"]], "csv_header"),
        ([["accession_number", "appearance", "classification"], ["A", "x", "y"]], "csv_header"),
        ([], "csv_empty"),
    ],
)
def test_bad_sheets_are_refused_naming_the_argument(
    site: Site, rows: list[list[str]], code: str
) -> None:
    # Prepare
    sheet = write_rows(site.files.root / "bad.csv", rows)
    audited = len(site.audit_actions())

    # Execute
    with pytest.raises(NodeError) as caught:
        import_labels(site.index, sheet, "operator")

    # Assert
    assert caught.value.code == code
    assert caught.value.message.startswith('Argument "csv_path"')
    assert len(site.audit_actions()) == audited  # the vault was not even read


def test_unreadable_sheets_are_refused(site: Site) -> None:
    # Prepare
    latin1 = site.files.root / "latin1.csv"
    latin1.write_bytes("accession_number;appearance\nÄ;typical\n".encode("latin-1"))

    # Execute / Assert
    for path, code in ((latin1, "csv_encoding"), (site.files.root / "nope.csv", "csv_unreadable")):
        with pytest.raises(NodeError) as caught:
            import_clinical(site.index, path, "operator")
        assert caught.value.code == code
        assert str(path) not in caught.value.message


def test_semicolon_sheets_with_a_bom_and_blank_rows_are_read(site: Site) -> None:
    # Prepare
    accession = next(i.accession for i in site.originals if i.modality in ("CR", "DX"))
    text = f"\ufeffAccession Number;Airspace Disease\n{accession};Moderate\n;\n\n"
    sheet = site.files.root / "semi.csv"
    sheet.write_text(text, encoding="utf-8")

    # Execute
    report = import_labels(site.index, sheet, "operator")

    # Assert
    assert (report.rows, report.matched, report.values, report.unmatched) == (1, 1, 1, [])


@pytest.mark.parametrize(
    ("name", "cell", "value"),
    [
        ("appearance", " typical appearance ", "Typical Appearance"),
        ("appearance", "NEGATIVE_FOR_PNEUMONIA", "Negative for Pneumonia"),
        ("airspace_disease", "2", "moderate"),
        ("age", "047Y", "47"),
        ("age", "6 months", "0"),
        ("age", "81.0", "81"),
        ("sex", "female", "F"),
        ("covid_test_result", "Not Detected", "negative"),
        ("covid_test_date", "20200305", dt.date(2020, 3, 5)),
        ("covid_test_date", "2020-03-05 00:00:00", dt.date(2020, 3, 5)),
        ("icu", "TRUE", "yes"),
        ("days_to_outcome", "12.0", "12"),
        ("death", "unknown", None),
        ("death", "", None),
    ],
)
def test_cells_are_normalised(name: str, cell: str, value: object) -> None:
    variable = next(v for v in (*schema.LABELS, *schema.CLINICAL) if v.name == name)

    assert parse(variable, cell) == value


@pytest.mark.parametrize(
    ("name", "cell"),
    [
        ("appearance", "Typcal"),
        ("age", "131"),
        ("age", "forty"),
        ("covid_test_date", "05/03/2020"),
        ("covid_test_date", "2020-02-30"),
        ("days_to_outcome", "-1"),
        ("admitted", "maybe"),
    ],
)
def test_bad_cells_are_refused_without_repeating_them(name: str, cell: str) -> None:
    variable = next(v for v in (*schema.LABELS, *schema.CLINICAL) if v.name == name)

    with pytest.raises(ValueError) as caught:
        parse(variable, cell)

    assert cell not in str(caught.value)


def test_segment_codes_are_the_standards_codes() -> None:
    known = {
        (code.value, code.scheme_designator): code.meaning
        for code in (
            codes.SCT.AnatomicalStructure,
            codes.SCT.MorphologicallyAbnormalStructure,
            codes.SCT.Lung,
            codes.DCM.GroundGlassOpacity,
        )
    }
    used = {c for s in schema.SEGMENT_LABELS for c in (s.category, s.property_type)}

    for coded in used:
        if (coded.value, coded.scheme) in known:
            assert known[(coded.value, coded.scheme)] == coded.meaning
    assert len({(c.value, c.scheme) for c in used} & set(known)) == 4


# -- segmentations ------------------------------------------------------------------------


def ct_series(site: Site) -> dict[str, set[str]]:
    """De-identified CT Series UID -> its de-identified SOP Instance UIDs (from the index)."""
    out: dict[str, set[str]] = {}
    for item in site.index.search(StudyQuery(modality="CT")).items:
        for series in site.index.study(item.study_instance_uid).series:
            if series.modality == "CT":
                out[series.series_instance_uid] = {i.sop_instance_uid for i in series.instances}
    return out


def test_seg_import_builds_one_seg_per_series_of_deidentified_references(site: Site) -> None:
    # Prepare
    series = ct_series(site)
    originals = {i.sop_uid: i for i in site.originals}

    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert report.applied and report.import_id is not None
    assert [o.status for o in report.objects] == ["written", "written"]
    assert {o.source_series for o in report.objects} == set(series)
    for obj in report.objects:
        path = site.settings.store_dir / obj.path
        seg = hd.seg.segread(path)
        source = series[obj.source_series]
        referenced = {
            ref.ReferencedSOPInstanceUID
            for item in seg.ReferencedSeriesSequence
            for ref in item.ReferencedInstanceSequence
        }
        assert referenced == source
        assert {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence} == {
            obj.source_series
        }
        ct = pydicom.dcmread(site.settings.store_dir / _path_of(site, next(iter(source))))
        assert (seg.PatientID, seg.PatientName, seg.StudyInstanceUID, seg.StudyDate) == (
            ct.PatientID,
            ct.PatientName,
            ct.StudyInstanceUID,
            ct.StudyDate,
        )
        assert str(ct.PatientID).startswith("SITE-")
        assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lung", "Ground-glass opacity"]
        lung = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
        assert (lung.CodeValue, lung.CodingSchemeDesignator) == ("39607008", "SCT")
        # The pixels are the site's masks, on the de-identified slices.
        truth = site.files.segments[originals[_original_sop(site, next(iter(source)))].series_uid]
        for number, label in enumerate(("Lung", "Ground-glass opacity"), start=1):
            for original_sop, mask in truth[label].items():
                pixels = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=[site.sops[original_sop]],
                    segment_numbers=[number],
                )
                assert np.array_equal(pixels[0, :, :, 0] != 0, mask)


def _path_of(site: Site, sop_uid: str) -> str:
    with site.index.db.read() as session:
        return session.scalars(select(Instance.path).where(Instance.sop_uid == sop_uid)).one()


def _original_sop(site: Site, sop_uid: str) -> str:
    return next(orig for orig, new in site.sops.items() if new == sop_uid)


def test_a_seg_holds_no_original_identifier_even_in_its_bytes(site: Site) -> None:
    # Prepare
    originals: set[str] = set(site.phi())
    # Every UID the originals hold, frame of reference and references included.
    for path in sorted((site.settings.home.parent / "export").rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.walk(lambda _, el: originals.add(str(el.value)) if el.VR == "UI" else None)
    originals = {o for o in originals if not o.startswith("1.2.840.10008.")}

    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert report.objects
    for obj in report.objects:
        raw = (site.settings.store_dir / obj.path).read_bytes()
        for value in originals:
            assert value.encode() not in raw, value
        assert all(value not in report.to_json() for value in originals)


@pytest.mark.parametrize("options", ["defaults", "basic"])
def test_a_seg_passes_the_nodes_own_phi_scan_so_its_study_can_be_shared(
    tmp_path: Path, options: str
) -> None:
    # Prepare: a node with the default options, or with every retain option off.
    corpus = write_site_corpus(tmp_path / "export", patients=1, ct_slices=3, ct_size=32)
    files = write_label_corpus(corpus, tmp_path / "sheets")
    deid = DeidOptions() if options == "defaults" else DeidOptions.basic()
    settings = load_settings(tmp_path / "home", deid=deid)
    index = open_index(settings)
    ingest([corpus.root], settings, index, engine_config(settings), 1, tmp_path / "run.jsonl")

    # Execute
    report = import_segmentations(index, settings, files.manifest_csv, "operator")

    # Assert: the scan that vets every study and gates every send finds nothing in a SEG
    # (highdicom's descriptions, contributing equipment and implementation UID would be
    # findings), and the SEG carries the de-identification record of its images.
    assert report.objects
    for obj in report.objects:
        path = settings.store_dir / obj.path
        findings = scan(path, deid, site_prefix=settings.site_id)
        assert findings == [], [(f.kind, f.location, f.message) for f in findings]
        seg = pydicom.dcmread(path)
        assert seg.PatientIdentityRemoved == "YES"
        assert "DeidentificationMethodCodeSequence" in seg
        assert seg.file_meta.ImplementationClassUID.startswith("2.25.")


def test_a_seg_is_recorded_in_the_index(site: Site) -> None:
    # Prepare
    before = site.index.counts()

    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    after = site.index.counts()
    assert after.by_modality.get("SEG") == 2
    assert after.instances == before.instances + 2 and after.studies == before.studies
    for obj in report.objects:
        study = next(s for s in site.studies.values() if s[0] in obj.path)[0]
        detail = site.index.study(study)
        seg_series = [s for s in detail.series if s.modality == "SEG"]
        assert [s.series_instance_uid for s in seg_series] == [obj.series_instance_uid]
        instance = seg_series[0].instances[0]
        assert instance.sop_instance_uid == obj.sop_instance_uid
        assert instance.number_of_frames == obj.frames == 3
        assert instance.received_via == "annotation"
        assert "SEG" in detail.modalities


def test_a_segs_study_is_read_from_its_images_vault_records_alone(site: Site) -> None:
    # Prepare: SEGs recorded (the node made them: no vault entry), then other records
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")
    seg_uid = report.objects[0].sop_instance_uid
    with site.index.db.read() as session:
        study_id = session.scalar(select(Instance.study_id).where(Instance.sop_uid == seg_uid))
        wanted = set(session.scalars(select(Instance.sop_uid).where(Instance.study_id == study_id)))
        records = set(
            session.scalars(select(Instance.vault_record).where(Instance.sop_uid.in_(wanted)))
        )
    last = None
    for n in range(5):
        last = site.index.vault.append([{"sop_instance_uid": [f"1.2.3.{n}", f"2.25.77{n}"]}])
    counter = CountingAESGCM(keys.vault_key(site.settings.keys_dir))
    site.index.vault._aead = counter

    # Execute
    found = original_identifiers(site.index, wanted, actor="vetting", purpose="PHI scan")

    # Assert: the SEG's row names no record and asks for no full read
    assert None in records and seg_uid in wanted
    assert counter.decrypted == len(records - {None})
    assert last is not None and counter.decrypted < last + 1  # not the whole vault
    assert set(found) == wanted - {seg_uid}
    assert found == {
        e["sop_instance_uid"][1]: e
        for e in site.index.vault.entries()
        if e["sop_instance_uid"][1] in wanted
    }


@pytest.mark.skipif(not DCIODVFY.exists(), reason="dicom3tools is not installed")
def test_dciodvfy_finds_no_error_in_a_seg(site: Site) -> None:
    # Prepare
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Execute
    results = [
        subprocess.run(
            [str(DCIODVFY), str(site.settings.store_dir / obj.path)],
            capture_output=True,
            text=True,
            check=False,
        )
        for obj in report.objects
    ]

    # Assert
    for result in results:
        output = result.stdout + result.stderr
        assert "Segmentation" in output
        assert [line for line in output.splitlines() if line.startswith("Error")] == []


def test_seg_rows_that_match_nothing_or_have_the_wrong_shape_are_skipped(site: Site) -> None:
    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert report.rows == 9 and report.matched == 8 and report.values == 6
    assert [(u.row, u.key) for u in report.unmatched] == [
        (r, "sop_instance_uid") for r in site.files.unmatched_rows["manifest.csv"]
    ]
    assert [(p.row, p.column) for p in report.unparseable] == [
        (r, "mask") for r in site.files.wrong_shape_rows
    ]
    assert all("16x16 mask for a 32x32 image" in p.reason for p in report.unparseable)
    assert [(c.column, c.reason) for c in report.ignored_columns] == [
        ("reader", "not a manifest column: dropped")
    ]


def test_seg_reimport_is_idempotent_and_a_changed_mask_overwrites_nothing(site: Site) -> None:
    # Prepare
    first = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")
    stored = {o.path: (site.settings.store_dir / o.path).read_bytes() for o in first.objects}
    counts = site.index.counts()

    # Execute
    again = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert [o.status for o in again.objects] == ["unchanged", "unchanged"]
    assert [o.sop_instance_uid for o in again.objects] == [
        o.sop_instance_uid for o in first.objects
    ]
    assert site.index.counts() == counts

    # Execute: one mask changes, the label set does not
    mask = next((site.files.manifest_csv.parent / "masks").glob("*_i1_lung.npy"))
    np.save(mask, np.zeros_like(np.load(mask)))
    changed = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert sorted(o.status for o in changed.objects) == ["conflict", "unchanged"]
    assert {
        o.path: (site.settings.store_dir / o.path).read_bytes() for o in first.objects
    } == stored
    assert site.index.counts() == counts


@pytest.mark.parametrize(
    ("rows", "code"),
    [
        ([["sop_instance_uid", "mask"], ["1.2.3", "m.npy"]], "manifest_columns"),
        ([], "csv_empty"),
        (None, "csv_unreadable"),
    ],
)
def test_an_unreadable_manifest_writes_nothing(
    site: Site, rows: list[list[str]] | None, code: str
) -> None:
    # Prepare
    manifest = site.files.root / "segmentations" / "bad.csv"
    if rows is not None:
        write_rows(manifest, rows)
    audited = len(site.audit_actions())
    counts = site.index.counts()
    listing = sorted(site.settings.store_dir.rglob("*.dcm"))

    # Execute
    with pytest.raises(NodeError) as caught:
        import_segmentations(site.index, site.settings, manifest, "operator")

    # Assert
    assert caught.value.code == code and caught.value.message.startswith('Argument "manifest"')
    assert sorted(site.settings.store_dir.rglob("*.dcm")) == listing
    assert site.index.counts() == counts
    assert len(site.audit_actions()) == audited


def test_seg_masks_must_be_binary_and_stay_beside_the_manifest(site: Site) -> None:
    # Prepare
    ct = next(i for i in site.originals if i.modality == "CT")
    folder = site.files.manifest_csv.parent
    np.save(folder / "grey.npy", np.arange(32 * 32).reshape(32, 32))
    shutil.copy(site.files.labels_csv, folder / "sheet.png")
    manifest = write_rows(
        folder / "odd.csv",
        [
            ["sop_instance_uid", "mask", "label"],
            [ct.sop_uid, "grey.npy", "Lung"],
            [ct.sop_uid, "../../labels.csv", "Lung"],
            [ct.sop_uid, str(folder / "grey.npy"), "Lung"],
            [ct.sop_uid, "sheet.png", "Lung"],
            [ct.sop_uid, "grey.npy", "Emphysema"],
            ["", "grey.npy", "Lung"],
        ],
    )

    # Execute
    report = import_segmentations(site.index, site.settings, manifest, "operator")

    # Assert
    assert not report.applied and report.objects == [] and report.import_id is None
    assert [(p.row, p.column) for p in report.unparseable] == [
        (2, "mask"),
        (3, "mask"),
        (4, "mask"),
        (5, "mask"),
        (6, "label"),
    ]
    assert [(u.row, u.reason) for u in report.unmatched] == [(7, "empty key")]
    assert str(folder) not in report.to_json()
    assert site.index.counts().by_modality.get("SEG") is None


def test_a_series_missing_from_the_store_gets_no_seg_and_the_others_go_on(site: Site) -> None:
    # Prepare: one slice of one CT series is gone from the store
    series = ct_series(site)
    broken, intact = sorted(series)
    (site.settings.store_dir / _path_of(site, sorted(series[broken])[0])).unlink()

    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    assert [o.source_series for o in report.objects] == [intact]
    failed = [p for p in report.unparseable if p.column == "sop_instance_uid"]
    assert len(failed) == 3 and all("no SEG could be built" in p.reason for p in failed)
    assert report.applied and report.values == 3 and report.studies == 1
    assert site.index.counts().by_modality.get("SEG") == 1


def test_the_seg_vault_read_is_audited_once(site: Site) -> None:
    # Prepare
    audited = len(site.audit_actions())

    # Execute
    report = import_segmentations(site.index, site.settings, site.files.manifest_csv, "operator")

    # Assert
    added = site.audit_actions()[audited:]
    assert [a for a, _, _ in added].count("originals.read") == 1
    assert str(added[0][2]["purpose"]).startswith("segmentation import")
    assert added[-1][:2] == ("segmentations.import", f"import:{report.import_id}")
    with site.index.db.read() as session:
        assert audit.verify(session).ok


def test_import_reports_are_plain_data() -> None:
    report = ImportReport(kind="labels", key="mrn")

    assert json.loads(report.to_json())["unmatched"] == []

"""The labelled training cohort: its files, its labels sheet, its manifest, and a real node."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from node.annotations.importer import import_labels
from node.index.models import Instance, Label, Study
from node.intake.ingest import ingest
from node.settings import load_settings
from node.site import engine_config, open_index
from protocols.imaging import load_image
from radfed.synth.cohort import (
    APPEARANCE_LABEL,
    NEGATIVE,
    POSITIVES,
    Cohort,
    cohort_manifest,
    write_cohort,
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    return write_cohort(tmp_path_factory.mktemp("cohort"), 12, seed=3, size=64)


def test_the_files_carry_the_truth_the_cohort_records(cohort: Cohort) -> None:
    found = {}
    for image in cohort.images:
        ds = pydicom.dcmread(image.path)
        found[str(ds.AccessionNumber)] = image.appearance
        assert str(ds.SOPInstanceUID) == image.sop_uid
        assert str(ds.StudyInstanceUID) == image.study_uid
        assert str(ds.Modality) in ("CR", "DX") and str(ds.Modality) == image.modality
        assert str(ds.PhotometricInterpretation) == image.photometric
        assert str(ds.PatientName) and str(ds.PatientID) == image.patient_id  # PHI, on purpose

    assert found == cohort.by_accession
    assert len(cohort.files) == 12
    assert sum(image.positive for image in cohort.images) == 6
    assert {a for a in cohort.by_sop_uid.values() if a != NEGATIVE} == set(POSITIVES)


def test_the_files_vary_the_way_exports_do(cohort: Cohort) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in cohort.files]

    assert {str(ds.PhotometricInterpretation) for ds in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert any(float(ds.get("RescaleSlope", 1)) != 1 for ds in headers)
    assert any("WindowCenter" in ds for ds in headers)
    assert any("WindowCenter" not in ds for ds in headers)


def test_positives_carry_an_opacity_and_negatives_do_not(tmp_path: Path) -> None:
    # Prepare: many images; the opacities brighten the lower lung zones on average.
    big = write_cohort(tmp_path, 40, seed=5, size=64)

    # Execute
    def lower_zones(image_path: Path) -> float:
        image = load_image(image_path, 64, standardize=False)
        return float(image[32:52, 10:54].mean())

    positives = [lower_zones(i.path) for i in big.images if i.appearance == "Typical Appearance"]
    negatives = [lower_zones(i.path) for i in big.images if not i.positive]

    # Assert
    assert np.mean(positives) > np.mean(negatives)


def test_labels_sheet_and_manifest(cohort: Cohort) -> None:
    with cohort.labels_csv.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    manifest = cohort_manifest(cohort, run="r-7", site="B")

    assert rows[0] == ["Accession Number", "Appearance"]
    assert dict((a, v) for a, v in rows[1:]) == cohort.by_accession
    assert (manifest.run, manifest.site) == ("r-7", "B")
    assert {s.study: s.labels[APPEARANCE_LABEL] for s in manifest.samples} == cohort.by_study_uid
    assert all(Path(s.path).is_absolute() and Path(s.path).is_file() for s in manifest.samples)


def test_same_arguments_same_files_and_sites_never_collide(tmp_path: Path) -> None:
    one = write_cohort(tmp_path / "one", 3, seed=1, site="A", size=32)
    again = write_cohort(tmp_path / "again", 3, seed=1, site="A", size=32)
    other = write_cohort(tmp_path / "other", 3, seed=1, site="B", size=32)

    assert [p.read_bytes() for p in one.files] == [p.read_bytes() for p in again.files]
    assert not set(one.by_sop_uid) & set(other.by_sop_uid)


def test_a_node_takes_the_cohort_and_its_labels(cohort: Cohort, tmp_path: Path) -> None:
    # Prepare: a node home.
    settings = load_settings(tmp_path / "home")
    index = open_index(settings)

    # Execute: ingest (de-identify) the files and import the labels sheet.
    ingest([cohort.root], settings, index, engine_config(settings), 1, tmp_path / "ingest.jsonl")
    report = import_labels(index, cohort.labels_csv, "test")

    # Assert: every study got its appearance, and the de-identified pixels are the same.
    assert report.matched == len(cohort.images)
    entries = list(index.vault.entries())  # the test's own view of the map, outside the node
    new_sop = {e["sop_instance_uid"][1]: e["sop_instance_uid"][0] for e in entries}
    new_study = {e["study_instance_uid"][1]: e["study_instance_uid"][0] for e in entries}
    with index.db.read() as session:
        labels = dict(
            session.execute(
                select(Study.study_uid, Label.value)
                .join(Label, Label.study_id == Study.id)
                .where(Label.name == "appearance")
            ).all()
        )
        instances = session.execute(
            select(Instance.sop_uid, Instance.study_id, Instance.path)
        ).all()
    assert {new_study[study]: value for study, value in labels.items()} == cohort.by_study_uid
    originals = {image.sop_uid: image for image in cohort.images}
    for sop_uid, _, path in instances:
        stored = Path(path) if Path(path).is_absolute() else settings.store_dir / path
        original = originals[new_sop[sop_uid]]
        np.testing.assert_array_equal(load_image(stored, 32), load_image(original.path, 32))

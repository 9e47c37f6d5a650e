"""The node's training decisions: the policy file, which samples a run may read, and ``admit``.

The index is the real node index (migrated SQLite); its rows are written directly so
each status and label case is explicit.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from node.errors import NodeError
from node.index.db import Database
from node.index.models import AuditEntry, ImportRun, Instance, Label, Patient, Series, Study
from node.training import runs
from node.training.cohort import Cohort, samples
from node.training.policy import TrainingPolicy
from protocols.training import TrainingManifest

APP = "a" * 64
OTHER = "b" * 64
NOW = dt.datetime(2026, 11, 27, tzinfo=dt.UTC)


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database.open(tmp_path / "index.sqlite")


def _study(
    db: Database, uid: str, status: str, modality: str = "CR", label: str | None = None
) -> None:
    with db.write() as session:
        patient = Patient(pseudonym=f"p-{uid}")
        session.add(patient)
        session.flush()
        study = Study(study_uid=uid, patient_id=patient.id, status=status, status_at=NOW)
        session.add(study)
        session.flush()
        series = Series(
            series_uid=f"{uid}.1", study_id=study.id, modality=modality, body_part="CHEST"
        )
        session.add(series)
        session.flush()
        for n, rows in ((1, 64), (2, None)):  # an image, and a non-image (no rows)
            session.add(
                Instance(
                    sop_uid=f"{uid}.1.{n}",
                    series_id=series.id,
                    study_id=study.id,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    rows=rows,
                    columns=rows,
                    transfer_syntax="1.2.840.10008.1.2.1",
                    size=1,
                    sha256="0" * 64,
                    path=f"{uid}/{n}.dcm",
                    received_via="folder",
                )
            )
        if label is not None:
            run = ImportRun(kind="labels", actor="t")
            session.add(run)
            session.flush()
            session.add(
                Label(
                    study_id=study.id,
                    scheme="ricord",
                    name="appearance",
                    value=label,
                    import_id=run.id,
                )
            )


def test_the_policy_runs_nothing_by_default_and_refuses_bad_hashes(tmp_path: Path) -> None:
    path = tmp_path / "training.toml"
    assert TrainingPolicy.load(path).apps == []

    TrainingPolicy(apps=[APP.upper()], manual_approval=True, eligible="shared").save(path)
    path2 = tmp_path / "broken.toml"
    path2.write_text('apps = ["not-a-hash"]\n')

    loaded = TrainingPolicy.load(path)
    assert loaded.apps == [APP] and loaded.manual_approval and loaded.statuses == ("shared",)
    with pytest.raises(NodeError) as bad:
        TrainingPolicy.load(path2)
    assert bad.value.code == "bad_training_policy"


def test_only_eligible_images_in_the_cohort_are_offered(db: Database, tmp_path: Path) -> None:
    _study(db, "1.1", "approved", label="Typical Appearance")
    _study(db, "1.2", "shared", label="Negative for Pneumonia")
    _study(db, "1.3", "held", label="Typical Appearance")
    _study(db, "1.4", "withdrawn")
    _study(db, "1.5", "rejected")
    _study(db, "1.6", "approved", modality="CT")
    _study(db, "1.7", "approved", modality="SEG")

    approved = samples(db, tmp_path, ("approved", "queued", "shared"), Cohort())
    shared = samples(db, tmp_path, ("shared",), Cohort())
    released = samples(
        db, tmp_path, ("approved", "queued", "shared"), Cohort("v1", (), frozenset({"1.2", "1.3"}))
    )
    typical = samples(
        db,
        tmp_path,
        ("approved", "queued", "shared"),
        Cohort.from_run_config("", "modality=CR;label=ricord:appearance=Typical Appearance"),
    )

    assert sorted(s.study for s in approved) == ["1.1", "1.2", "1.6"]
    assert all(s.path.endswith("1.dcm") for s in approved)  # images only
    assert [s.study for s in shared] == ["1.2"]
    assert [s.study for s in released] == ["1.2"]  # held 1.3 stays out even if released
    assert [s.study for s in typical] == ["1.1"]
    assert typical[0].labels == {"ricord:appearance": "Typical Appearance"}
    with pytest.raises(NodeError):
        Cohort.from_run_config("", "patient_name=X")


def test_admit_follows_the_policy_and_audits_each_decision(db: Database, tmp_path: Path) -> None:
    _study(db, "1.1", "approved", label="Typical Appearance")
    build = lambda cohort: samples(db, tmp_path, ("approved",), cohort)  # noqa: E731
    allow = TrainingPolicy(apps=[APP])
    manual = TrainingPolicy(apps=[APP], manual_approval=True)

    wrong_app = runs.admit(db, tmp_path, allow, "north", "run-0001", "7", OTHER, Cohort(), build)
    waiting = runs.admit(db, tmp_path, manual, "north", "run-0002", "8", APP, Cohort(), build)
    runs.decide(db, "run-0002", True, "olga")
    approved = runs.admit(db, tmp_path, manual, "north", "run-0002", "8", APP, Cohort(), build)
    by_policy = runs.admit(db, tmp_path, allow, "north", "run-0003", "9", APP, Cohort(), build)
    swapped = runs.admit(db, tmp_path, allow, "north", "run-0003", "9", OTHER, Cohort(), build)
    runs.decide(db, "run-0004", False, "olga", "not this one")
    declined = runs.admit(db, tmp_path, allow, "north", "run-0004", "10", APP, Cohort(), build)
    later = runs.admit(
        db, tmp_path, TrainingPolicy(apps=[OTHER]), "north", "run-0001", "7", OTHER, Cohort(), build
    )
    empty = runs.admit(
        db,
        tmp_path,
        allow,
        "north",
        "run-0005",
        "11",
        APP,
        Cohort.from_run_config("", "modality=MR"),
        build,
    )

    assert not wrong_app.accepted and "not on this site's training policy" in wrong_app.reason
    assert not waiting.accepted and "approval" in waiting.reason
    assert approved.accepted and approved.manifest is not None
    manifest = TrainingManifest.model_validate_json(approved.manifest.read_bytes())
    assert manifest.run == "run-0002" and manifest.app_hash == APP
    assert [s.study for s in manifest.samples] == ["1.1"]
    assert approved.manifest.stat().st_mode & 0o077 == 0
    assert by_policy.accepted
    assert later.accepted  # the policy's own decline is made again once the policy allows it
    assert not swapped.accepted and "another app bundle" in swapped.reason
    assert not declined.accepted and declined.reason == "not this one"
    assert not empty.accepted and "no eligible exams" in empty.reason
    with db.read() as session:
        entries = [(e.action, e.subject) for e in session.scalars(select(AuditEntry))]
    assert ("training.decline", "run-0001") in entries
    assert ("training.pending", "run-0002") in entries
    assert ("training.approve", "run-0002") in entries
    assert ("training.accept", "run-0003") in entries
    assert ("training.cohort", "run-0002") in entries
    status = {v.run: v.status for v in runs.list_runs(db)}
    assert status == {
        "run-0001": "accepted",
        "run-0002": "accepted",
        "run-0003": "declined",
        "run-0004": "declined",
        "run-0005": "accepted",
    }


def test_rounds_are_counted_and_audited(db: Database, tmp_path: Path) -> None:
    _study(db, "1.1", "approved", label="Typical Appearance")
    build = lambda cohort: samples(db, tmp_path, ("approved",), cohort)  # noqa: E731
    runs.admit(
        db, tmp_path, TrainingPolicy(apps=[APP]), "north", "run-0001", "7", APP, Cohort(), build
    )

    runs.record_round(db, "run-0001", "1", "train", 12)
    runs.record_round(db, "run-0001", "1", "evaluate", 4)
    runs.record_round(db, "run-0001", "2", "train", 12)

    assert runs.list_runs(db)[0].rounds == 2
    with db.read() as session:
        trained = [
            json.loads(e.details)
            for e in session.scalars(
                select(AuditEntry).where(AuditEntry.action == "training.train")
            )
        ]
    assert [(t["round"], t["samples"], t["app_hash"]) for t in trained] == [
        ("1", 12, APP),
        ("2", 12, APP),
    ]

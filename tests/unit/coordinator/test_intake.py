"""Intake without HTTP, on SQLite and PostgreSQL: registration is all or nothing.

The exam is real de-identified DICOM (synthetic CT through ``radfed node deid``);
the node is an enrolled site of the registry under test. Failures are injected
where a real one could happen — inside the registration transaction, in the
object store, between storing a file and recording it — and the registry must
hold either the whole exam or none of it, with the upload able to finish later.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from coordinator import audit, pki
from coordinator.errors import CoordinatorError
from coordinator.identity import NodeIdentity
from coordinator.intake import Intake
from coordinator.objects import FilesystemStore
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    Upload,
)
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    LabelEntry,
    Receipt,
    SeriesEntry,
    UploadCreate,
)
from protocols.deid.options import DeidOptions
from protocols.signing import sign_manifest
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION
from radfed.synth.site import write_site_corpus
from tests.helpers import run_cli
from tests.unit.coordinator.test_sites import enrolled_node


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """De-identified CT instances of one study, as a node writes them."""
    base = tmp_path_factory.mktemp("intake-deid")
    write_site_corpus(
        base / "src", patients=1, ct_slices=3, ct_size=32, cr_size=32, with_us=False, with_sr=False
    )
    run_cli(
        "node",
        "deid",
        str(base / "src"),
        str(base / "out"),
        "-q",
        "--home",
        str(base / "h"),
        check=True,
    )
    files = sorted((base / "out").rglob("*.dcm"))
    by_study: dict[str, list[Path]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.Modality == "CT":
            by_study.setdefault(str(ds.StudyInstanceUID), []).append(path)
    return next(iter(by_study.values()))


def manifest_for(files: list[Path], site: str) -> ExamManifest:
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    series: dict[str, list[InstanceEntry]] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = path.read_bytes()
        series.setdefault(str(ds.SeriesInstanceUID), []).append(
            InstanceEntry(
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return ExamManifest(
        protocol_version=PROTOCOL_VERSION,
        site=site,
        exam=ExamEntry(
            pseudonym=str(first.PatientID),
            study_instance_uid=str(first.StudyInstanceUID),
            modalities=["CT"],
            series=[
                SeriesEntry(series_instance_uid=uid, modality="CT", instances=instances)
                for uid, instances in series.items()
            ],
        ),
        deid=DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION),
        labels=[LabelEntry(scheme="ricord", name="appearance", value="Typical")],
        clinical={"sex": "F", "icu": "yes"},
        created_at=dt.datetime.now(dt.UTC),
    )


def counts(db: Database) -> dict[str, int]:
    with db.read() as session:
        return {
            table.__tablename__: session.scalar(select(func.count()).select_from(table)) or 0
            for table in (Exam, ExamSeries, ExamInstance, ExamLabel, ExamClinical)
        }


def opened(
    db: Database, settings: CoordinatorSettings, files: list[Path]
) -> tuple[Intake, NodeIdentity, str]:
    key, cert = enrolled_node(db, settings, "st-marys")
    node = NodeIdentity("st-marys", 1, pki.fingerprint(cert))
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(cert, x509.Certificate)
    signed = sign_manifest(manifest_for(files, "st-marys"), key, cert)
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    upload = intake.open(node, UploadCreate(signed=signed))
    for path in files:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        intake.put_chunk(node, upload.upload_id, sha, 0, path.read_bytes())
    return intake, node, upload.upload_id


def test_a_failure_inside_registration_leaves_no_trace_and_a_retry_registers(
    db: Database,
    settings: CoordinatorSettings,
    ct_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the audit append is the last step of the registration transaction.
    intake, node, upload_id = opened(db, settings, ct_files)
    real_append = audit.append

    def failing(session, actor, action, subject, **details):  # type: ignore[no-untyped-def]
        if action == "exam.register":
            raise OSError("disk full")
        return real_append(session, actor, action, subject, **details)

    monkeypatch.setattr(audit, "append", failing)

    # Execute
    with pytest.raises(OSError, match="disk full"):
        intake.complete(node, upload_id)
    after_failure = counts(db)
    monkeypatch.setattr(audit, "append", real_append)
    receipt = intake.complete(node, upload_id)

    # Assert
    assert after_failure == {
        "exams": 0,
        "series": 0,
        "instances": 0,
        "labels": 0,
        "clinical_values": 0,
    }
    assert isinstance(receipt, Receipt) and receipt.instances == len(ct_files)
    assert counts(db) == {
        "exams": 1,
        "series": 1,
        "instances": len(ct_files),
        "labels": 1,
        "clinical_values": 2,
    }
    with db.read() as session:
        assert audit.verify(session).ok
        assert session.scalar(select(Upload.status)) == "registered"


def test_a_store_that_fails_keeps_the_file_unfinished_until_it_is_sent_again(
    db: Database,
    settings: CoordinatorSettings,
    ct_files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare
    key, cert = enrolled_node(db, settings, "st-marys")
    node = NodeIdentity("st-marys", 1, pki.fingerprint(cert))
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    upload = intake.open(
        node, UploadCreate(signed=sign_manifest(manifest_for(ct_files, "st-marys"), key, cert))
    )
    data = ct_files[0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    def full(*_: object) -> bool:
        raise CoordinatorError("object_store_io", "No space left on device", retryable=True)

    # Execute
    monkeypatch.setattr(intake.store, "put_file", full)
    monkeypatch.setattr(intake.store, "put_stream", full)
    with pytest.raises(CoordinatorError) as caught:
        intake.put_chunk(node, upload.upload_id, sha, 0, data)
    state_after = intake.status(node, upload.upload_id)
    monkeypatch.undo()
    half = len(data) // 2
    resent = intake.put_chunk(node, upload.upload_id, sha, 0, data[:half])
    finished = intake.put_chunk(node, upload.upload_id, sha, half, data[half:])

    # Assert
    assert caught.value.retryable
    entry = next(f for f in state_after.files if f.sha256 == sha)
    assert not entry.complete and entry.received == 0
    assert (resent.received, resent.complete) == (half, False)
    assert finished.complete and intake.store.exists(sha)


def test_a_crash_after_storing_a_file_before_recording_it_is_recovered(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    # Prepare: the object is in the store, the registry still says "not received".
    key, cert = enrolled_node(db, settings, "st-marys")
    node = NodeIdentity("st-marys", 1, pki.fingerprint(cert))
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    signed = sign_manifest(manifest_for(ct_files, "st-marys"), key, cert)
    upload = intake.open(node, UploadCreate(signed=signed))
    data = ct_files[0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    intake.store.put_stream([data], sha)

    # Execute: the node, never acknowledged, sends the file again.
    again = intake.put_chunk(node, upload.upload_id, sha, 0, data)

    # Assert
    assert again.complete
    assert intake.store.size(sha) == len(data)


def test_an_offset_the_coordinator_does_not_hold_is_refused_with_where_to_resume(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    # Prepare
    intake_key, cert = enrolled_node(db, settings, "st-marys")
    node = NodeIdentity("st-marys", 1, pki.fingerprint(cert))
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    upload = intake.open(
        node,
        UploadCreate(signed=sign_manifest(manifest_for(ct_files, "st-marys"), intake_key, cert)),
    )
    data = ct_files[0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    intake.put_chunk(node, upload.upload_id, sha, 0, data[:100])

    # Execute
    with pytest.raises(CoordinatorError) as gap:
        intake.put_chunk(node, upload.upload_id, sha, 300, data[300:400])
    with pytest.raises(CoordinatorError) as past_end:
        intake.put_chunk(node, upload.upload_id, sha, 100, data[100:] + b"extra")

    # Assert
    assert gap.value.code == "offset_mismatch" and "holds 100 bytes" in gap.value.message
    assert gap.value.retryable
    assert past_end.value.code == "too_many_bytes"
    assert (
        next(f for f in intake.status(node, upload.upload_id).files if f.sha256 == sha).received
        == 100
    )


def test_an_upload_left_open_expires_and_its_partial_files_go(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    # Prepare
    key, cert = enrolled_node(db, settings, "st-marys")
    node = NodeIdentity("st-marys", 1, pki.fingerprint(cert))
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    signed = sign_manifest(manifest_for(ct_files, "st-marys"), key, cert)
    upload = intake.open(node, UploadCreate(signed=signed))
    data = ct_files[0].read_bytes()
    intake.put_chunk(node, upload.upload_id, hashlib.sha256(data).hexdigest(), 0, data[:50])
    partial = settings.uploads_dir / upload.upload_id

    # Execute
    early = intake.sweep()
    late = intake.sweep(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=8))
    reopened = intake.open(node, UploadCreate(signed=signed))

    # Assert
    assert partial.exists() is False and (early, late) == (0, 1)
    assert intake.status(node, upload.upload_id).rejection is not None
    assert intake.status(node, upload.upload_id).rejection.code == "expired"  # type: ignore[union-attr]
    assert reopened.upload_id != upload.upload_id and reopened.status == "open"


def test_an_object_torn_by_a_crash_is_asked_for_again(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    # Prepare: every file in, then one object loses its tail (not flushed before a crash).
    intake, node, upload_id = opened(db, settings, ct_files)
    data = ct_files[1].read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    stored = intake.store.path(sha)  # type: ignore[attr-defined]
    stored.write_bytes(data[: len(data) // 2])

    # Execute
    with pytest.raises(CoordinatorError) as caught:
        intake.complete(node, upload_id)
    state = {f.sha256: f.complete for f in intake.status(node, upload_id).files}
    intake.put_chunk(node, upload_id, sha, 0, data)
    receipt = intake.complete(node, upload_id)

    # Assert
    assert caught.value.code == "upload_incomplete" and caught.value.retryable
    assert state[sha] is False and sum(state.values()) == len(ct_files) - 1
    assert counts(db)["exams"] == 1 and isinstance(receipt, Receipt)
    assert intake.store.open(sha).read() == data


def test_an_uploads_file_locks_go_when_it_closes(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    # Prepare: an open upload with its files put (one lock per file while open).
    # They were kept until the hourly sweep: ~400 bytes a file, 30 MB in a
    # 20-minute load run (bench/load_coordinator.py, tracemalloc).
    intake, node, upload_id = opened(db, settings, ct_files)
    held_while_open = len(intake._locks.get(upload_id, {}))

    # Execute
    intake.complete(node, upload_id)

    # Assert
    assert held_while_open == len(ct_files)
    assert upload_id not in intake._locks
    assert upload_id not in intake._open_uploads


def test_a_sweep_drops_locks_left_by_requests_on_uploads_not_open(
    db: Database, settings: CoordinatorSettings, ct_files: list[Path]
) -> None:
    intake, node, upload_id = opened(db, settings, ct_files)
    with pytest.raises(CoordinatorError):
        intake.put_chunk(node, "no-such-upload", "0" * 64, 0, b"x")

    intake.sweep()

    assert set(intake._locks) == {upload_id}  # the open upload keeps its own

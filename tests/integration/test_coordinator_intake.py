"""Contribution intake end to end: a real node uploads to a real coordinator over mutual TLS.

The node (its index, store, key; ``node.share``) builds and signs manifests and
sends files; the coordinator (``radfed coordinator serve`` as a process, on
SQLite and on PostgreSQL) verifies, scans and registers — or refuses. Bad
input is made the way it would arrive: a manifest changed after signing, a
file whose bytes are not its digest, a file the manifest does not list, an
instance with a name planted in it, an upload cut off half-way.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from node import federation
from node.errors import NodeError
from node.settings import NodeSettings, load_settings
from node.share.manifest import ExamPackage, build_manifest, package
from node.share.upload import send_exam
from node.site import open_index
from protocols.api.coordinator import ExamManifest, Receipt, Rejection, UploadCreate
from protocols.signing import sign_manifest
from radfed.synth.site import write_site_corpus
from tests.helpers import CoordinatorProcess, PgSchema, run_cli

pytestmark = pytest.mark.integration


@dataclass
class Setup:
    coordinator: CoordinatorProcess
    env: dict[str, str]
    db_url: str
    node: NodeSettings
    other: NodeSettings
    base: Path

    def client(self) -> federation.CoordinatorClient:
        return federation.CoordinatorClient(self.node)

    def studies(self) -> dict[str, str]:
        """Study UID -> modalities of the node's studies."""
        with sqlite3.connect(self.node.home / "index.sqlite") as db:
            return dict(db.execute("SELECT study_uid, modalities FROM studies").fetchall())

    def study(self, modality: str) -> str:
        return next(uid for uid, mods in self.studies().items() if mods == modality)

    def unregistered(self, modality: str) -> str:
        """A study of ``modality`` the coordinator has not registered (yet)."""
        registered = {row[0] for row in self.query("SELECT study_uid FROM exams")}
        return next(
            uid
            for uid, mods in self.studies().items()
            if mods == modality and uid not in registered
        )

    def package(self, study_uid: str) -> ExamPackage:
        files = federation.files(self.node)
        with self.client() as client:
            site = client.site
        return package(open_index(self.node), self.node, study_uid, site, files.key, files.cert)

    def sign(self, manifest: ExamManifest) -> Any:
        files = federation.files(self.node)
        key = serialization.load_pem_private_key(files.key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return sign_manifest(manifest, key, x509.load_pem_x509_certificate(files.cert.read_bytes()))

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        engine = create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql))]
        finally:
            engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def setup(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp(f"intake-{request.param}")
    home = base / "coordinator"
    with PgSchema() as schema:
        url = (
            schema.url if request.param == "postgresql" else f"sqlite:///{home / 'registry.sqlite'}"
        )
        env = {"RADFED_COORDINATOR_DATABASE_URL": url}
        run_cli("coordinator", "init", "--home", str(home), env=env, check=True)
        tokens = {
            name: run_cli(
                "coordinator", "site", "add", name, "--home", str(home), env=env, check=True
            ).stdout.strip()
            for name in ("st-marys", "other-site")
        }
        corpus = base / "export"
        write_site_corpus(corpus, patients=2, ct_slices=3, ct_size=64, cr_size=64, with_us=False)
        node_home = base / "node"
        run_cli("node", "ingest", str(corpus), "--home", str(node_home), "-q", check=True)
        with CoordinatorProcess(home, env=env) as coordinator:
            for name, where in (("st-marys", node_home), ("other-site", base / "other-node")):
                run_cli(
                    "node",
                    "enroll",
                    coordinator.url,
                    tokens[name],
                    "--home",
                    str(where),
                    check=True,
                )
            yield Setup(
                coordinator,
                env,
                url,
                load_settings(node_home),
                load_settings(base / "other-node"),
                base,
            )


def test_an_exam_is_registered_once_and_its_files_are_stored_by_digest(setup: Setup) -> None:
    # Prepare
    study = setup.study("CT\\SR")
    exam = setup.package(study)

    # Execute
    with setup.client() as client:
        first = send_exam(client, exam, chunk=1000)
        again = send_exam(client, exam)

    # Assert
    assert isinstance(first, Receipt) and isinstance(again, Receipt)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert first.instances == len(exam.files) == exam.signed.manifest.instance_count
    assert first.manifest_sha256 == again.manifest_sha256
    rows = setup.query(
        f"SELECT e.instance_count, e.series_count, e.patient_pseudonym, s.name FROM exams e "
        f"JOIN sites s ON s.id = e.site_id WHERE e.study_uid = '{study}'"
    )
    assert rows == [
        (
            len(exam.files),
            len(exam.signed.manifest.exam.series),
            exam.signed.manifest.exam.pseudonym,
            "st-marys",
        )
    ]
    stored = {
        row[0]
        for row in setup.query(
            f"SELECT i.sha256 FROM instances i JOIN exams e ON e.id = i.exam_id "
            f"WHERE e.study_uid = '{study}'"
        )
    }
    assert stored == set(exam.files)
    for sha256, path in exam.files.items():
        held = setup.coordinator.home / "objects" / sha256[:2] / sha256[2:4] / sha256
        assert held.read_bytes() == path.read_bytes()
    assert setup.query(
        f"SELECT count(*) FROM audit_log WHERE action = 'exam.register' AND subject = '{study}'"
    ) == [(1,)]


def test_an_interrupted_upload_resumes_where_the_coordinator_stopped(setup: Setup) -> None:
    # Prepare: the first attempt dies after two chunks of the first file.
    study = setup.study("DX")
    exam = setup.package(study)
    sent: list[tuple[str, int]] = []

    def cut(sha256: str, offset: int) -> None:
        sent.append((sha256, offset))
        if len(sent) == 2:
            raise ConnectionError("cable pulled")

    with setup.client() as client, pytest.raises(ConnectionError):
        send_exam(client, exam, chunk=2048, on_chunk=cut)
    first_file, held = sent[-1]
    resumed: list[tuple[str, int]] = []

    # Execute: the coordinator restarts too; the node sends again.
    setup.coordinator.stop()
    setup.coordinator.start()
    with setup.client() as client:
        status = client.request(
            "POST", "/api/v1/uploads", json=UploadCreate(signed=exam.signed).model_dump(mode="json")
        ).json()
        outcome = send_exam(client, exam, chunk=2048, on_chunk=lambda s, o: resumed.append((s, o)))

    # Assert
    assert held == 4096
    files = {f["sha256"]: f for f in status["files"]}
    assert files[first_file]["received"] == 4096 and not files[first_file]["complete"]
    assert isinstance(outcome, Receipt) and not outcome.duplicate
    first_resumed = next(o for s, o in resumed if s == first_file)
    assert first_resumed == 4096 + min(2048, files[first_file]["size"] - 4096)


def test_a_manifest_changed_after_signing_is_refused(setup: Setup) -> None:
    # Prepare
    exam = setup.package(setup.study("DX"))
    signed = exam.signed
    changed_exam = signed.manifest.exam.model_copy(update={"body_part": "HEAD"})
    tampered = signed.model_copy(
        update={"manifest": signed.manifest.model_copy(update={"exam": changed_exam})}
    )

    # Execute
    with setup.client() as client, pytest.raises(NodeError) as caught:
        send_exam(client, ExamPackage(tampered, exam.files))

    # Assert
    assert caught.value.code == "bad_signature"


def test_a_manifest_of_another_site_or_key_is_refused(setup: Setup) -> None:
    # Prepare: a second enrolled site signs with its own key; st-marys sends it.
    other = setup.other
    manifest, files = build_manifest(
        open_index(setup.node), setup.node, setup.study("DX"), "other-site"
    )
    theirs = federation.files(other)
    key = serialization.load_pem_private_key(theirs.key.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signed_by_other = sign_manifest(
        manifest, key, x509.load_pem_x509_certificate(theirs.cert.read_bytes())
    )
    naming_other = setup.sign(manifest)

    # Execute
    codes = []
    for signed in (signed_by_other, naming_other):
        with setup.client() as client, pytest.raises(NodeError) as caught:
            send_exam(client, ExamPackage(signed, files))
        codes.append(caught.value.code)

    # Assert
    assert codes == ["signer_mismatch", "site_mismatch"]


def test_bytes_that_are_not_their_digest_are_refused_and_can_be_sent_again(
    setup: Setup, tmp_path: Path
) -> None:
    # Prepare: the same size, one byte different.
    exam = setup.package(setup.study("CR"))
    sha256, path = next(iter(exam.files.items()))
    bad = tmp_path / "bad.dcm"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    bad.write_bytes(bytes(data))

    # Execute
    with setup.client() as client:
        with pytest.raises(NodeError) as caught:
            send_exam(client, ExamPackage(exam.signed, {**exam.files, sha256: bad}))
        retried = send_exam(client, exam)

    # Assert
    assert caught.value.code == "sha256_mismatch"
    assert isinstance(retried, Receipt)


def test_a_file_the_manifest_does_not_list_is_refused(setup: Setup) -> None:
    # Prepare: an upload left open (an exam not sent before).
    manifest, _ = build_manifest(
        open_index(setup.node), setup.node, setup.study("CT\\SR"), "st-marys"
    )
    first = manifest.exam.series[0]
    unsent = first.instances[0].model_copy(
        update={"sha256": hashlib.sha256(b"never sent").hexdigest(), "size": 10}
    )
    series = [first.model_copy(update={"instances": [unsent, *first.instances[1:]]})]
    fresh = manifest.model_copy(
        update={
            "exam": manifest.exam.model_copy(
                update={
                    "study_instance_uid": "2.25.77",
                    "series": series + manifest.exam.series[1:],
                }
            )
        }
    )
    signed = setup.sign(ExamManifest.model_validate(fresh.model_dump()))
    with setup.client() as client:
        opened = client.request(
            "POST", "/api/v1/uploads", json=UploadCreate(signed=signed).model_dump(mode="json")
        ).json()
        held = [f for f in opened["files"] if f["complete"]]

        # Execute
        stray = client.request(
            "PUT",
            f"/api/v1/uploads/{opened['upload_id']}/files/{'ab' * 32}",
            params={"offset": 0},
            content=b"not in the manifest",
        )
        same_file_again = client.request(
            "PUT",
            f"/api/v1/uploads/{opened['upload_id']}/files/{held[0]['sha256']}",
            params={"offset": 0},
            content=b"whatever",
        )
        early = client.request("POST", f"/api/v1/uploads/{opened['upload_id']}/complete")

    # Assert: the other files are held already (content-addressed), the new one is not.
    assert opened["status"] == "open" and len(held) == len(opened["files"]) - 1
    assert stray.status_code == 404 and stray.json()["code"] == "file_not_in_manifest"
    assert same_file_again.status_code == 200 and same_file_again.json()["complete"] is True
    assert early.status_code == 409 and early.json()["code"] == "upload_incomplete"


def test_the_same_exam_packaged_again_is_the_same_exam(setup: Setup) -> None:
    # Prepare: sent once; later the node packages it again (a new manifest time).
    study = setup.study("CT\\SR")
    with setup.client() as client:
        first = send_exam(client, setup.package(study))
        repackaged = setup.package(study)

        # Execute
        second = send_exam(client, repackaged)

    # Assert
    assert isinstance(first, Receipt) and isinstance(second, Receipt)
    assert second.duplicate and second.manifest_sha256 == first.manifest_sha256
    assert setup.query(f"SELECT count(*) FROM exams WHERE study_uid = '{study}'") == [(1,)]


def _with_planted_name(setup: Setup, tmp_path: Path) -> tuple[ExamPackage, str]:
    """A CT exam with a patient's name planted deep in one instance, re-signed by the node."""
    manifest, files = build_manifest(
        open_index(setup.node), setup.node, setup.unregistered("CT\\SR"), "st-marys"
    )
    sha256, path = next(iter(files.items()))
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.PatientName = "Smithfield^Harriet"
    ds.ReferencedPatientSequence = pydicom.Sequence([item])
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    planted = tmp_path / "planted.dcm"
    planted.write_bytes(buffer.getvalue())
    new_sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    series = [
        s.model_copy(
            update={
                "instances": [
                    i.model_copy(update={"sha256": new_sha, "size": len(buffer.getvalue())})
                    if i.sha256 == sha256
                    else i
                    for i in s.instances
                ]
            }
        )
        for s in manifest.exam.series
    ]
    changed = manifest.model_copy(
        update={"exam": manifest.exam.model_copy(update={"series": series})}
    )
    files = {k: v for k, v in files.items() if k != sha256} | {new_sha: planted}
    return ExamPackage(
        setup.sign(ExamManifest.model_validate(changed.model_dump())), files
    ), new_sha


def test_a_phi_bearing_instance_quarantines_the_exam(setup: Setup, tmp_path: Path) -> None:
    # Prepare
    exam, planted = _with_planted_name(setup, tmp_path)
    study = exam.signed.manifest.study_instance_uid
    before = setup.query(f"SELECT count(*) FROM exams WHERE study_uid = '{study}'")

    # Execute
    with setup.client() as client:
        outcome = send_exam(client, exam)
        again = send_exam(client, exam)

    # Assert
    assert isinstance(outcome, Rejection) and isinstance(again, Rejection)
    assert outcome.code == "phi_found" and not outcome.retryable
    assert {(f.kind, f.severity) for f in outcome.findings} >= {("person_name", "critical")}
    assert all(f.excerpt == "" for f in outcome.findings)  # nothing of it is kept
    assert "Smithfield" not in outcome.model_dump_json()
    assert setup.query(f"SELECT count(*) FROM exams WHERE study_uid = '{study}'") == before
    assert not (setup.coordinator.home / "objects" / planted[:2] / planted[2:4] / planted).exists()
    statuses = setup.query(
        f"SELECT status FROM uploads WHERE study_uid = '{study}' ORDER BY id DESC LIMIT 1"
    )
    assert statuses == [("quarantined",)]
    assert setup.query(
        f"SELECT count(*) FROM audit_log WHERE action = 'upload.quarantine' AND subject = '{study}'"
    ) == [(1,)]


def test_a_file_that_is_not_what_the_manifest_says_is_rejected(setup: Setup) -> None:
    # Prepare: two instances of the CT exam swap their manifest entries' UIDs.
    manifest, files = build_manifest(
        open_index(setup.node), setup.node, setup.study("CT\\SR"), "st-marys"
    )
    first_series = manifest.exam.series[0]
    a, b = first_series.instances[0], first_series.instances[1]
    swapped = [
        a.model_copy(update={"sop_instance_uid": b.sop_instance_uid}),
        b.model_copy(update={"sop_instance_uid": a.sop_instance_uid}),
        *first_series.instances[2:],
    ]
    series = [first_series.model_copy(update={"instances": swapped}), *manifest.exam.series[1:]]
    changed = manifest.model_copy(
        update={
            "exam": manifest.exam.model_copy(
                update={"series": series, "study_instance_uid": "2.25.1"}
            )
        }
    )
    exam = ExamPackage(setup.sign(ExamManifest.model_validate(changed.model_dump())), files)

    # Execute
    with setup.client() as client:
        outcome = send_exam(client, exam)

    # Assert
    assert isinstance(outcome, Rejection) and outcome.code == "manifest_mismatch"
    mismatches = {(r.code, r.message.split(" ")[0]) for r in outcome.reasons}
    assert ("manifest_mismatch", "SOPInstanceUID") in mismatches
    assert ("manifest_mismatch", "StudyInstanceUID") in mismatches
    assert setup.query("SELECT count(*) FROM exams WHERE study_uid = '2.25.1'") == [(0,)]


def test_only_the_uploading_site_sees_its_upload(setup: Setup) -> None:
    # Prepare
    exam = setup.package(setup.study("CT\\SR"))
    with setup.client() as client:
        upload_id = client.request(
            "POST", "/api/v1/uploads", json=UploadCreate(signed=exam.signed).model_dump(mode="json")
        ).json()["upload_id"]

    # Execute
    with federation.CoordinatorClient(setup.other) as theirs:
        peek = theirs.request("GET", f"/api/v1/uploads/{upload_id}")

    # Assert
    assert peek.status_code == 404 and peek.json()["code"] == "upload_not_found"

"""Intake under abuse, on SQLite and PostgreSQL: floods of open uploads, replays, hostile names.

Each test is what a compromised or careless enrolled node (or someone holding
one of its old messages) could do: open uploads it never completes, declare files
larger than any disk, send a signed manifest again after its exam was withdrawn,
reuse a request token across a coordinator restart, name its patients like
paths. The refusals must be clear, retryable only where waiting helps, and leave
nothing half-applied.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from coordinator import pki, releases
from coordinator.errors import CoordinatorError
from coordinator.identity import NodeIdentity, NonceCache, authenticate_node
from coordinator.intake import Intake
from coordinator.objects import FilesystemStore
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry, Exam, Upload
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import (
    DeidRecord,
    ExamEntry,
    ExamManifest,
    InstanceEntry,
    Receipt,
    SeriesEntry,
    SignedManifest,
    UploadCreate,
)
from protocols.deid.options import DeidOptions
from protocols.nodeauth import make_token
from protocols.signing import sign_manifest
from protocols.version import DEID_PROFILE_VERSION, PROTOCOL_VERSION
from tests.unit.coordinator.test_intake import ct_files, manifest_for  # noqa: F401 - fixture
from tests.unit.coordinator.test_sites import enrolled_node


class Site:
    """An enrolled site of the registry under test, signing its own manifests."""

    def __init__(self, db: Database, settings: CoordinatorSettings, name: str, site_id: int):
        self.name = name
        self.key, self.cert = enrolled_node(db, settings, name)
        assert isinstance(self.key, ec.EllipticCurvePrivateKey)
        assert isinstance(self.cert, x509.Certificate)
        self.node = NodeIdentity(name, site_id, pki.fingerprint(self.cert))

    def sign(self, manifest: ExamManifest) -> SignedManifest:
        return sign_manifest(manifest, self.key, self.cert)

    def fake(self, sizes: list[int], pseudonym: str = "SITE-ABCDEFGH") -> SignedManifest:
        """A signed manifest of a new study whose files (random digests) were never made."""
        return self.sign(
            ExamManifest(
                protocol_version=PROTOCOL_VERSION,
                site=self.name,
                exam=ExamEntry(
                    pseudonym=pseudonym,
                    study_instance_uid=f"2.25.{secrets.randbits(100)}",
                    modalities=["CT"],
                    series=[
                        SeriesEntry(
                            series_instance_uid=f"2.25.{secrets.randbits(100)}",
                            modality="CT",
                            instances=[
                                InstanceEntry(
                                    sop_instance_uid=f"2.25.{secrets.randbits(100)}",
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                    size=size,
                                    sha256=secrets.token_hex(32),
                                )
                                for size in sizes
                            ],
                        )
                    ],
                ),
                deid=DeidRecord.of(DeidOptions(), DEID_PROFILE_VERSION),
                created_at=dt.datetime.now(dt.UTC),
            )
        )


def uploads_of(db: Database, site_id: int) -> int:
    with db.read() as session:
        return (
            session.scalar(
                select(func.count()).select_from(Upload).where(Upload.site_id == site_id)
            )
            or 0
        )


def refused(action: object) -> CoordinatorError:
    assert callable(action)
    with pytest.raises(CoordinatorError) as caught:
        action()
    return caught.value


def test_a_site_may_hold_only_so_many_uploads_open(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    settings = settings.model_copy(update={"max_open_uploads_per_site": 3})
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    flooding, other = Site(db, settings, "flooding", 1), Site(db, settings, "other", 2)
    first = flooding.fake([100])
    opened = [intake.open(flooding.node, UploadCreate(signed=first))]
    opened += [intake.open(flooding.node, UploadCreate(signed=flooding.fake([100]))) for _ in "ab"]

    # Execute
    over = refused(lambda: intake.open(flooding.node, UploadCreate(signed=flooding.fake([100]))))
    again = intake.open(flooding.node, UploadCreate(signed=first))
    elsewhere = intake.open(other.node, UploadCreate(signed=other.fake([100])))
    expired = intake.sweep(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=8))
    after = intake.open(flooding.node, UploadCreate(signed=flooding.fake([100])))

    # Assert
    assert (over.code, over.retryable) == ("too_many_open_uploads", True)
    assert "max_open_uploads_per_site" in over.message
    assert again.upload_id == opened[0].upload_id  # the same manifest again: its own session
    assert elsewhere.status == "open" and after.status == "open" and expired == 4
    assert uploads_of(db, 1) == 4  # the three, and the one after they expired: none half-made


def test_the_bytes_open_uploads_declare_are_bounded(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare: a site may declare 2000 bytes in open uploads.
    settings = settings.model_copy(update={"max_open_upload_gib_per_site": 2000 / 2**30})
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    site = Site(db, settings, "big", 1)
    intake.open(site.node, UploadCreate(signed=site.fake([800])))
    intake.open(site.node, UploadCreate(signed=site.fake([400, 400])))
    huge = site.fake([10**15])  # a petabyte, declared

    # Execute
    never = refused(lambda: intake.open(site.node, UploadCreate(signed=huge)))
    later = refused(lambda: intake.open(site.node, UploadCreate(signed=site.fake([800]))))

    # Assert
    assert (never.code, never.retryable) == ("upload_too_large", False)
    assert (later.code, later.retryable) == ("too_many_open_uploads", True)
    assert uploads_of(db, 1) == 2
    with db.read() as session:  # a refusal that retrying cannot mend is audited
        actions = session.scalars(select(AuditEntry.action)).all()
    assert actions.count("upload.refused") == 1


def test_an_abandoned_upload_takes_the_objects_only_it_brought(
    db: Database,
    settings: CoordinatorSettings,
    ct_files: list[Path],  # noqa: F811 - the fixture
) -> None:
    # Prepare: a registered exam; then an upload that sends one of its files and a new
    # one, and is never completed.
    store = FilesystemStore(settings.objects_dir)
    intake = Intake(db, settings, store)
    site = Site(db, settings, "st-marys", 1)
    signed = site.sign(manifest_for(ct_files, "st-marys"))
    upload = intake.open(site.node, UploadCreate(signed=signed))
    for path in ct_files:
        data = path.read_bytes()
        intake.put_chunk(site.node, upload.upload_id, hashlib.sha256(data).hexdigest(), 0, data)
    assert isinstance(intake.complete(site.node, upload.upload_id), Receipt)
    shared = ct_files[0].read_bytes()
    stray = os.urandom(3000)
    abandoned = signed.manifest.model_copy(
        update={
            "exam": signed.manifest.exam.model_copy(
                update={
                    "study_instance_uid": f"2.25.{secrets.randbits(100)}",
                    "series": [
                        SeriesEntry(
                            series_instance_uid=f"2.25.{secrets.randbits(100)}",
                            modality="CT",
                            instances=[
                                InstanceEntry(
                                    sop_instance_uid=f"2.25.{secrets.randbits(100)}",
                                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                    size=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(),
                                )
                                for data in (shared, stray)
                            ],
                        )
                    ],
                }
            )
        }
    )
    left = intake.open(site.node, UploadCreate(signed=site.sign(abandoned)))
    for data in (shared, stray):
        intake.put_chunk(site.node, left.upload_id, hashlib.sha256(data).hexdigest(), 0, data)
    assert store.exists(hashlib.sha256(stray).hexdigest())

    # Execute
    expired = intake.sweep(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=8))

    # Assert
    assert expired == 1
    assert not store.exists(hashlib.sha256(stray).hexdigest())
    for path in ct_files:  # the registered exam keeps every file
        assert store.exists(hashlib.sha256(path.read_bytes()).hexdigest())


def test_a_withdrawn_exam_is_not_taken_again_nor_given_a_receipt(
    db: Database,
    settings: CoordinatorSettings,
    ct_files: list[Path],  # noqa: F811 - the fixture
) -> None:
    # Prepare: registered, then withdrawn by its site.
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    site = Site(db, settings, "st-marys", 1)
    signed = site.sign(manifest_for(ct_files, "st-marys"))
    upload = intake.open(site.node, UploadCreate(signed=signed))
    for path in ct_files:
        data = path.read_bytes()
        intake.put_chunk(site.node, upload.upload_id, hashlib.sha256(data).hexdigest(), 0, data)
    receipt = intake.complete(site.node, upload.upload_id)
    assert isinstance(receipt, Receipt)
    before_again = intake.open(site.node, UploadCreate(signed=signed))
    withdrawn = releases.withdraw(db, 1, receipt.study_instance_uid, "consent revoked", "site")

    # Execute: the captured manifest, its old upload, and a new packaging of the exam.
    replayed = refused(lambda: intake.open(site.node, UploadCreate(signed=signed)))
    completed = refused(lambda: intake.complete(site.node, upload.upload_id))
    repackaged = site.sign(manifest_for(ct_files, "st-marys"))
    again = refused(lambda: intake.open(site.node, UploadCreate(signed=repackaged)))

    # Assert
    assert before_again.receipt is not None  # registered and not withdrawn: idempotent
    for refusal in (replayed, completed, again):
        assert (refusal.code, refusal.retryable) == ("exam_withdrawn", False)
    assert uploads_of(db, 1) == 1
    with db.read() as session:
        exam = session.scalar(select(Exam))
        assert exam is not None and exam.withdrawn_at is not None
        assert exam.withdrawn_at.replace(tzinfo=dt.UTC) == withdrawn.withdrawn_at.replace(
            tzinfo=dt.UTC
        )


@pytest.mark.parametrize(
    "pseudonym",
    [
        "../../../../tmp/escape",
        "/etc/passwd",
        "SITE/../../x",
        "..",
        ".",
        ".hidden",
        "SITE\\..\\x",
        "SITE-\x00ABC",
        "SITE-\u2024\u2024",  # one-dot leaders, which some tools fold to "."
        "\uff0e\uff0e",  # fullwidth full stops
        " SITE",
        "SITE\nX",
    ],
)
def test_a_pseudonym_that_could_name_a_path_is_refused(
    db: Database, settings: CoordinatorSettings, pseudonym: str
) -> None:
    # Prepare
    intake = Intake(db, settings, FilesystemStore(settings.objects_dir))
    site = Site(db, settings, "st-marys", 1)

    # Execute
    refusal = refused(
        lambda: intake.open(site.node, UploadCreate(signed=site.fake([10], pseudonym)))
    )

    # Assert
    assert (refusal.code, refusal.retryable) == ("invalid_manifest", False)
    assert uploads_of(db, 1) == 0


def test_a_node_token_from_before_a_restart_cannot_be_replayed(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare: a token spent with the coordinator that ran before.
    key, cert = enrolled_node(db, settings, "st-marys")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    fp, der = pki.fingerprint(cert), cert.public_bytes(serialization.Encoding.DER)
    path = "/api/v1/node/heartbeat"

    def check(header: str, nonces: NonceCache) -> str:
        try:
            return authenticate_node(
                db, header, "POST", path, der, True, max_age_s=300, nonces=nonces
            ).site
        except CoordinatorError as exc:
            return f"{exc.code} retryable={exc.retryable}"

    spent = make_token(key, "st-marys", fp, "POST", path)
    assert check(spent, NonceCache()) == "st-marys"

    # Execute: the coordinator restarts a little later, with a fresh nonce cache.
    restarted = NonceCache(started_at=time.time() + 2)
    replayed = check(spent, restarted)
    fresh = check(make_token(key, "st-marys", fp, "POST", path, now=time.time() + 3), restarted)

    # Assert
    assert replayed == "node_token_stale retryable=True"
    assert fresh == "st-marys"


def test_a_full_nonce_cache_does_not_reopen_a_forgotten_token(
    db: Database, settings: CoordinatorSettings
) -> None:
    # Prepare
    key, cert = enrolled_node(db, settings, "st-marys")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    fp, der = pki.fingerprint(cert), cert.public_bytes(serialization.Encoding.DER)
    path = "/api/v1/node/heartbeat"
    nonces = NonceCache(limit=2, started_at=time.time() - 10)
    now = time.time()
    tokens = [make_token(key, "st-marys", fp, "POST", path, now=now - 5 + i) for i in range(3)]

    def check(header: str) -> str:
        try:
            return authenticate_node(
                db, header, "POST", path, der, True, max_age_s=300, nonces=nonces
            ).site
        except CoordinatorError as exc:
            return exc.code

    # Execute: three tokens fill a cache of two; the first is forced out unexpired.
    taken = [check(token) for token in tokens]
    replayed = check(tokens[0])

    # Assert
    assert taken == ["st-marys"] * 3
    assert replayed == "node_token_stale"

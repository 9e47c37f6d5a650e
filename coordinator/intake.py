"""Contribution intake: signed manifests, resumable uploads, checks, atomic registration.

A node opens an upload with its signed manifest. The coordinator checks that
the manifest was signed with the certificate the calling node presented and
that both belong to the site the manifest names, then says which files it
needs (a file it already holds, content-addressed, counts as received). Files
arrive in chunks at the offset the coordinator holds; a broken connection costs
only the chunk in flight. A finished file must hash to its manifest entry; a
file that is not in the manifest is refused.

Completing the upload re-reads every instance from the object store: its UIDs,
SOP class, modality and pseudonym must be what the manifest says, and the PHI
scanner (``protocols.phi.scanner``, the one the nodes run) must find nothing at
or above ``quarantine_at_or_above``. An exam that fails is refused or
quarantined — its objects are deleted unless a registered exam uses them — and
the site receives the reasons and findings (without excerpts: the coordinator
keeps no fragment of what it refused). An exam that passes is registered in
one transaction: exam, series, instances, labels, clinical variables and the
audit entry, or nothing. The same manifest twice is one exam; the same file
twice is a no-op.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import multiprocessing
import os
import re
import secrets
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from cryptography import x509
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from coordinator import audit
from coordinator.errors import CoordinatorError
from coordinator.identity import NodeIdentity
from coordinator.objects import FilesystemStore, ObjectStore
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    NodeCertificate,
    Site,
    Upload,
    UploadFile,
)
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import (
    ExamFinding,
    ExamManifest,
    Receipt,
    Rejection,
    RejectionReason,
    SignedManifest,
    UploadCreate,
    UploadFileState,
    UploadPublic,
    UploadStatus,
)
from protocols.deid.options import DeidOptions
from protocols.phi.findings import Severity
from protocols.phi.scanner import scan
from protocols.signing import SignatureError, manifest_digest, verify_manifest
from protocols.sqltypes import utcnow

log = logging.getLogger("radfed.coordinator.intake")

#: A pseudonym names a folder of every release export (``coordinator.releases``).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The most one chunk may carry.
MAX_CHUNK = 64 * 1024 * 1024
#: How long an open upload keeps its partial files.
UPLOAD_TTL = dt.timedelta(days=7)
OPEN_STATES = (UploadStatus.OPEN.value, UploadStatus.COMPLETE.value)


@dataclass
class Intake:
    """Uploads of one coordinator: the registry, the object store, the partial files."""

    db: Database
    settings: CoordinatorSettings
    store: ObjectStore
    #: Per-file write locks by upload: dropped when the upload closes (they were kept
    #: until the hourly sweep: ~400 bytes a file, 30 MB in a 20-minute load run).
    _locks: dict[str, dict[str, threading.Lock]] = field(default_factory=dict)
    _executor: ProcessPoolExecutor | None = None
    #: Open uploads by public id: (site id, {sha256: size}); dropped when they close.
    _open_uploads: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    # -- opening -------------------------------------------------------------------------

    def open(self, node: NodeIdentity, body: UploadCreate) -> UploadPublic:
        """An upload session for a signed manifest (the same one again: the same session).

        A refusal (signature, site, a conflicting exam) is audited before it is raised.
        """
        try:
            return self._open(node, body)
        except CoordinatorError as exc:
            if exc.retryable:
                raise
            with self.db.write() as session:
                audit.append(
                    session,
                    "intake",
                    "upload.refused",
                    body.signed.manifest.study_instance_uid,
                    site=node.site,
                    code=exc.code,
                    message=exc.message,
                )
            raise

    def _open(self, node: NodeIdentity, body: UploadCreate) -> UploadPublic:
        manifest = self._verified(node, body.signed)
        digest = manifest_digest(manifest)
        study_uid = manifest.study_instance_uid
        with self.db.write() as session:
            exam = session.scalar(select(Exam).where(Exam.study_uid == study_uid))
            if exam is not None:
                if exam.site_id != node.site_id:
                    raise CoordinatorError(
                        "exam_conflict", f"study {study_uid} was contributed by another site"
                    )
                if exam.withdrawn_at is not None:
                    # A manifest sent again (or replayed) after the site took the exam back
                    # does not bring it back, nor gets a receipt as if it had.
                    raise _withdrawn(study_uid)
                if exam.manifest_sha256 != digest and not _same_exam(exam.manifest, manifest):
                    raise CoordinatorError(
                        "exam_conflict",
                        f"study {study_uid} is registered with another manifest; "
                        "withdraw it before sending a new version",
                    )
                done = session.scalar(
                    select(Upload)
                    .where(
                        Upload.study_uid == study_uid,
                        Upload.manifest_sha256 == exam.manifest_sha256,
                        Upload.status == UploadStatus.REGISTERED.value,
                    )
                    .order_by(Upload.id.desc())
                )
                if done is not None:
                    return self._public(session, done)
            current = session.scalar(
                select(Upload).where(
                    Upload.site_id == node.site_id,
                    Upload.study_uid == study_uid,
                    Upload.status.in_(OPEN_STATES),
                )
            )
            if current is not None and current.manifest_sha256 == digest:
                return self._public(session, current)
            # The same manifest refused before is refused again, without another scan
            # (unless the refusal was about the session, not the exam: expired, superseded).
            for refused in session.scalars(
                select(Upload)
                .where(
                    Upload.site_id == node.site_id,
                    Upload.manifest_sha256 == digest,
                    Upload.status.in_(
                        (UploadStatus.QUARANTINED.value, UploadStatus.REJECTED.value)
                    ),
                )
                .order_by(Upload.id.desc())
            ):
                outcome = Rejection.model_validate_json(refused.outcome or "{}")
                if not outcome.retryable and outcome.code != "superseded":
                    return self._public(session, refused)
            self._within_quota(session, node, manifest, current.id if current else None)
            if current is not None:
                self._closed(current.public_id)
                current.status = UploadStatus.REJECTED.value
                current.outcome = _rejection_json(
                    "superseded", "a newer manifest of this exam was opened", retryable=False
                )
                current.updated_at = utcnow()
            upload = Upload(
                public_id=secrets.token_hex(16),
                site_id=node.site_id,
                study_uid=study_uid,
                manifest_sha256=digest,
                signed_manifest=body.signed.model_dump_json(),
            )
            session.add(upload)
            session.flush()
            held = 0
            for instance in manifest.instances():
                have = self.store.exists(instance.sha256)
                held += have
                session.add(
                    UploadFile(
                        upload_id=upload.id,
                        sha256=instance.sha256,
                        size=instance.size,
                        received=instance.size if have else 0,
                        complete=have,
                    )
                )
            audit.append(
                session,
                f"site:{node.site}",
                "upload.open",
                study_uid,
                upload=upload.public_id,
                manifest=digest,
                files=manifest.instance_count,
                already_held=held,
            )
            session.flush()
            return self._public(session, upload)

    def _within_quota(
        self, session: Session, node: NodeIdentity, manifest: ExamManifest, replacing: int | None
    ) -> None:
        """Refuse a new upload past the site's open uploads or the bytes they may declare."""
        most = int(self.settings.max_open_upload_gib_per_site * 2**30)
        if manifest.total_size > most:
            raise CoordinatorError(
                "upload_too_large",
                f"the exam's files add up to {manifest.total_size} bytes; a site's open "
                f"uploads may declare {most} bytes at most (max_open_upload_gib_per_site)",
            )
        others = [Upload.site_id == node.site_id, Upload.status.in_(OPEN_STATES)]
        if replacing is not None:
            others.append(Upload.id != replacing)
        count = session.scalar(select(func.count()).select_from(Upload).where(*others)) or 0
        if count >= self.settings.max_open_uploads_per_site:
            raise CoordinatorError(
                "too_many_open_uploads",
                f"site {node.site} has {count} uploads open, the most it may "
                "(max_open_uploads_per_site); complete them or let them expire, then retry",
                retryable=True,
            )
        declared = (
            session.scalar(
                select(func.coalesce(func.sum(UploadFile.size), 0))
                .join(Upload, Upload.id == UploadFile.upload_id)
                .where(*others)
            )
            or 0
        )
        if declared + manifest.total_size > most:
            raise CoordinatorError(
                "too_many_open_uploads",
                f"site {node.site}'s open uploads declare {declared} bytes; this exam's "
                f"{manifest.total_size} more would pass {most} (max_open_upload_gib_per_site); "
                "retry once they are done",
                retryable=True,
            )

    def _verified(self, node: NodeIdentity, signed: SignedManifest) -> ExamManifest:
        if signed.signer_fingerprint != node.fingerprint:
            raise CoordinatorError(
                "signer_mismatch",
                "the manifest was signed with another certificate than the one making this request",
            )
        with self.db.read() as session:
            pem = session.scalar(
                select(NodeCertificate.pem).where(NodeCertificate.fingerprint == node.fingerprint)
            )
        if pem is None:  # pragma: no cover - authenticate_node found it
            raise CoordinatorError("unauthorized", "unknown node certificate")
        try:
            manifest = verify_manifest(signed, x509.load_pem_x509_certificate(pem.encode("ascii")))
        except SignatureError as exc:
            raise CoordinatorError("bad_signature", exc.message) from exc
        if manifest.site != node.site:
            raise CoordinatorError(
                "site_mismatch", f"the manifest names site {manifest.site}, not {node.site}"
            )
        if SAFE_NAME.fullmatch(manifest.exam.pseudonym) is None:
            # It names the exam's folder in every release export: nothing that could
            # climb out of it (and no exam that would make every release fail).
            raise CoordinatorError(
                "invalid_manifest",
                'the exam\'s pseudonym must be 1-64 letters, digits, ".", "_" and "-", '
                "starting with a letter or digit",
            )
        return manifest

    # -- files ---------------------------------------------------------------------------

    def status(self, node: NodeIdentity, upload_id: str) -> UploadPublic:
        with self.db.read() as session:
            return self._public(session, self._upload(session, node, upload_id))

    def put_chunk(
        self, node: NodeIdentity, upload_id: str, sha256: str, offset: int, data: bytes
    ) -> UploadFileState:
        """Append ``data`` at ``offset`` of one file; the file is stored once it is whole."""
        if len(data) > MAX_CHUNK:
            raise CoordinatorError(
                "chunk_too_large", f"a chunk may carry {MAX_CHUNK} bytes at most"
            )
        listed = self._listed(upload_id)
        if listed is not None and offset == 0 and sha256 in listed[1]:
            # The common case without the registry: a whole file in one chunk.
            site_id, files = listed
            if site_id != node.site_id:
                raise CoordinatorError("upload_not_found", f"no upload {upload_id} of this site")
            size = files[sha256]
            if len(data) == size:
                with self._lock(upload_id, sha256):
                    return self._whole(sha256, data)
        with self._lock(upload_id, sha256):
            with self.db.read() as session:
                found = session.execute(
                    select(Upload.id, Upload.site_id, Upload.status).where(
                        Upload.public_id == upload_id
                    )
                ).first()
                if found is None or found.site_id != node.site_id:
                    raise CoordinatorError(
                        "upload_not_found", f"no upload {upload_id} of this site"
                    )
                if found.status not in OPEN_STATES:
                    raise CoordinatorError(
                        "upload_closed", f"upload {upload_id} is {found.status}; open a new one"
                    )
                row = session.execute(
                    select(
                        UploadFile.id, UploadFile.size, UploadFile.received, UploadFile.complete
                    ).where(UploadFile.upload_id == found.id, UploadFile.sha256 == sha256)
                ).first()
                if row is None:
                    raise CoordinatorError(
                        "file_not_in_manifest", f"file {sha256} is not listed in the manifest"
                    )
                file_id, size, received, complete = row
            if complete or (received == 0 and offset == 0 and self.store.exists(sha256)):
                return UploadFileState(sha256=sha256, size=size, received=size, complete=True)
            if offset != received:
                raise CoordinatorError(
                    "offset_mismatch",
                    f"the coordinator holds {received} bytes of {sha256}; resume from there",
                    retryable=True,
                )
            if received + len(data) > size:
                raise CoordinatorError(
                    "too_many_bytes", f"file {sha256} is {size} bytes; this chunk goes past its end"
                )
            if received == 0 and len(data) == size:
                return self._whole(sha256, data)
            part = self._part(upload_id, sha256)
            _write_at(part, received, data)
            received += len(data)
            if received == size:
                return self._finish(file_id, part, sha256, size)
            with self.db.write() as session:
                stored = session.get(UploadFile, file_id)
                if stored is not None:
                    stored.received = received
            return UploadFileState(sha256=sha256, size=size, received=received, complete=False)

    def _whole(self, sha256: str, data: bytes) -> UploadFileState:
        """A file that came in one chunk: checked and stored without a partial copy."""
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise CoordinatorError(
                "sha256_mismatch",
                f"the bytes received hash to {actual}, not {sha256}; send the file again",
            )
        # The object is the record: a file is complete once the store holds it, so the
        # common one-chunk file costs no registry write (complete() records them all).
        self.store.put_stream([data], sha256)
        return UploadFileState(sha256=sha256, size=len(data), received=len(data), complete=True)

    def _mark_complete(self, file_id: int, size: int) -> None:
        with self.db.write() as session:
            session.execute(
                update(UploadFile)
                .where(UploadFile.id == file_id)
                .values(received=size, complete=True)
            )

    def _finish(self, file_id: int, part: Path, sha256: str, size: int) -> UploadFileState:
        digest = hashlib.sha256()
        with open(part, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != sha256:
            part.unlink(missing_ok=True)
            with self.db.write() as session:
                stored = session.get(UploadFile, file_id)
                if stored is not None:
                    stored.received = 0
            raise CoordinatorError(
                "sha256_mismatch",
                f"the bytes received hash to {digest.hexdigest()}, not {sha256}; "
                "send the file again",
            )
        self.store.put_file(part, sha256)
        self._mark_complete(file_id, size)
        part.unlink(missing_ok=True)
        return UploadFileState(sha256=sha256, size=size, received=size, complete=True)

    # -- completing ----------------------------------------------------------------------

    def complete(self, node: NodeIdentity, upload_id: str) -> Receipt | Rejection:
        """Check every instance and register the exam, or refuse it with the reasons."""
        with self.db.read() as session:
            upload = self._upload(session, node, upload_id)
            if upload.status == UploadStatus.REGISTERED.value:
                withdrawn = session.scalar(
                    select(Exam.withdrawn_at).where(Exam.study_uid == upload.study_uid)
                )
                if withdrawn is not None:
                    raise _withdrawn(upload.study_uid)
                return self._receipt(session, upload, duplicate=True)
            if upload.status not in OPEN_STATES:
                return Rejection.model_validate_json(upload.outcome or "{}")
            unrecorded = session.scalars(
                select(UploadFile.sha256).where(
                    UploadFile.upload_id == upload.id, UploadFile.complete.is_(False)
                )
            ).all()
            signed = SignedManifest.model_validate_json(upload.signed_manifest)
            upload_pk = upload.id
        missing = [sha for sha in unrecorded if not self.store.exists(sha)]
        if missing:
            raise CoordinatorError(
                "upload_incomplete",
                f"{len(missing)} file(s) of the manifest have not been received",
                retryable=True,
            )
        manifest = signed.manifest
        reasons, findings = self._check(manifest)
        torn = {
            r.location.split(" ")[0] for r in reasons if r.code == "object_damaged" and r.location
        }
        if torn:
            # An object lost or torn by a crash before it was flushed: send it again.
            for sha in torn:
                self.store.delete(sha)
            with self.db.write() as session:
                session.execute(
                    update(UploadFile)
                    .where(UploadFile.upload_id == upload_pk, UploadFile.sha256.in_(torn))
                    .values(received=0, complete=False)
                )
            raise CoordinatorError(
                "upload_incomplete",
                f"{len(torn)} file(s) were damaged on the coordinator; send them again",
                retryable=True,
            )
        if reasons or findings:
            quarantined = bool(findings) and not reasons
            rejection = Rejection(
                code="phi_found" if quarantined else "manifest_mismatch",
                message=(
                    f"the coordinator's PHI scan found {len(findings)} finding(s); "
                    "the exam is quarantined and was not registered"
                    if quarantined
                    else "the files do not match the manifest; the exam was not registered"
                ),
                retryable=False,
                reasons=reasons,
                findings=findings,
            )
            self._refuse(node, upload_pk, manifest, rejection, quarantined)
            return rejection
        return self._register(node, upload_pk, manifest)

    def _check(self, manifest: ExamManifest) -> tuple[list[RejectionReason], list[ExamFinding]]:
        """Every instance checked against its manifest entry and scanned, on every core."""
        prefix = manifest.exam.pseudonym.rsplit("-", 1)[0]
        site_prefix = prefix if prefix and prefix != manifest.exam.pseudonym else None
        common = {
            "StudyInstanceUID": manifest.study_instance_uid,
            "PatientID": manifest.exam.pseudonym,
        }
        options = manifest.deid.to_options().model_dump()
        jobs = []
        for series in manifest.exam.series:
            for entry in series.instances:
                expected = {
                    **common,
                    "SOPInstanceUID": entry.sop_instance_uid,
                    "SOPClassUID": entry.sop_class_uid,
                    "SeriesInstanceUID": series.series_instance_uid,
                    "Modality": series.modality,
                }
                local = (
                    self.store.path(entry.sha256)
                    if isinstance(self.store, FilesystemStore)
                    else None
                )
                source: str | bytes
                if local is not None:
                    source = str(local)
                else:
                    with self.store.open(entry.sha256) as handle:
                        source = handle.read()
                jobs.append(
                    (
                        source,
                        f"{entry.sha256} ({entry.sop_instance_uid})",
                        entry.sop_instance_uid,
                        expected,
                        options,
                        site_prefix,
                        self.settings.quarantine_at_or_above,
                    )
                )
        pool = self._pool()
        results = (
            list(pool.map(check_instance, *zip(*jobs, strict=True), chunksize=4))
            if pool is not None and len(jobs) > 1
            else [check_instance(*job) for job in jobs]
        )
        reasons = [RejectionReason.model_validate(r) for rs, _ in results for r in rs]
        findings = [ExamFinding.model_validate(f) for _, fs in results for f in fs]
        return reasons, findings

    def _pool(self) -> ProcessPoolExecutor | None:
        workers = self.settings.scan_workers
        if workers == 1:
            return None
        with self._guard:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    max_workers=self._workers(),
                    mp_context=multiprocessing.get_context("forkserver"),
                )
            return self._executor

    def _workers(self) -> int:
        return self.settings.scan_workers or os.cpu_count() or 1

    def warm(self) -> None:
        """Start the scanning processes now, so the first exam does not wait for them."""
        pool = self._pool()
        if pool is not None:
            list(pool.map(_ready, range(self._workers())))

    def close(self) -> None:
        """Stop the scanning processes."""
        with self._guard:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None

    def _refuse(
        self,
        node: NodeIdentity,
        upload_pk: int,
        manifest: ExamManifest,
        rejection: Rejection,
        quarantined: bool,
    ) -> None:
        with self.db.write() as session:
            upload = session.get(Upload, upload_pk)
            if upload is None or upload.status not in OPEN_STATES:
                return
            self._closed(upload.public_id)
            upload.status = (
                UploadStatus.QUARANTINED.value if quarantined else UploadStatus.REJECTED.value
            )
            upload.outcome = rejection.model_dump_json()
            upload.updated_at = utcnow()
            audit.append(
                session,
                "intake",
                "upload.quarantine" if quarantined else "upload.reject",
                manifest.study_instance_uid,
                site=node.site,
                upload=upload.public_id,
                code=rejection.code,
                reasons=len(rejection.reasons),
                findings=sorted({f.kind for f in rejection.findings}),
            )
            used = set(
                session.scalars(
                    select(ExamInstance.sha256).where(
                        ExamInstance.sha256.in_([i.sha256 for i in manifest.instances()])
                    )
                ).all()
            )
        # What failed is not kept: only objects a registered exam uses stay.
        for instance in manifest.instances():
            if instance.sha256 not in used:
                self.store.delete(instance.sha256)
        log.warning(
            "upload %s of %s from %s refused: %s",
            upload_pk,
            manifest.study_instance_uid,
            node.site,
            rejection.code,
        )

    def _register(self, node: NodeIdentity, upload_pk: int, manifest: ExamManifest) -> Receipt:
        digest = manifest_digest(manifest)
        study_uid = manifest.study_instance_uid
        self.store.sync(i.sha256 for i in manifest.instances())  # durable before registered
        with self.db.write() as session:
            session.execute(
                update(UploadFile)
                .where(UploadFile.upload_id == upload_pk)
                .values(received=UploadFile.size, complete=True)
            )
            upload = session.get(Upload, upload_pk)
            if upload is None:  # pragma: no cover - rows are never deleted
                raise CoordinatorError("not_found", "unknown upload")
            existing = session.scalar(select(Exam).where(Exam.study_uid == study_uid))
            if existing is not None:
                # Registered meanwhile by a concurrent completion of the same manifest.
                if existing.manifest_sha256 == digest and existing.site_id == node.site_id:
                    self._closed(upload.public_id)
                    upload.status = UploadStatus.REGISTERED.value
                    return self._receipt(session, upload, duplicate=True)
                raise CoordinatorError("exam_conflict", f"study {study_uid} is registered already")
            exam = Exam(
                site_id=node.site_id,
                study_uid=study_uid,
                patient_pseudonym=manifest.exam.pseudonym,
                study_date=manifest.exam.study_date,
                modality="\\".join(sorted(set(manifest.exam.modalities))),
                body_part=manifest.exam.body_part,
                series_count=len(manifest.exam.series),
                instance_count=manifest.instance_count,
                size=manifest.total_size,
                manifest_sha256=digest,
                manifest=manifest.model_dump_json(),
                deid_profile=manifest.deid.profile_version,
            )
            session.add(exam)
            session.flush()
            for series in manifest.exam.series:
                row = ExamSeries(
                    exam_id=exam.id,
                    series_uid=series.series_instance_uid,
                    modality=series.modality,
                    body_part=series.body_part,
                    series_number=series.series_number,
                    instance_count=len(series.instances),
                )
                session.add(row)
                session.flush()
                session.add_all(
                    ExamInstance(
                        exam_id=exam.id,
                        series_id=row.id,
                        sop_uid=i.sop_instance_uid,
                        sop_class_uid=i.sop_class_uid,
                        size=i.size,
                        sha256=i.sha256,
                    )
                    for i in series.instances
                )
            session.add_all(
                ExamLabel(exam_id=exam.id, scheme=lab.scheme, name=lab.name, value=lab.value)
                for lab in manifest.labels
            )
            session.add_all(
                ExamClinical(exam_id=exam.id, variable=k, value=v)
                for k, v in manifest.clinical.items()
            )
            self._closed(upload.public_id)
            upload.status = UploadStatus.REGISTERED.value
            upload.updated_at = utcnow()
            audit.append(
                session,
                "intake",
                "exam.register",
                study_uid,
                site=node.site,
                upload=upload.public_id,
                manifest=digest,
                instances=manifest.instance_count,
                bytes=manifest.total_size,
            )
            session.flush()
            receipt = self._receipt(session, upload, duplicate=False)
        session_dir = self.settings.uploads_dir / upload.public_id
        _remove_dir(session_dir)
        log.info("registered %s from %s (%d instances)", study_uid, node.site, exam.instance_count)
        return receipt

    # -- housekeeping --------------------------------------------------------------------

    def sweep(self, now: dt.datetime | None = None) -> int:
        """Expire uploads left open past ``UPLOAD_TTL``: their partial files go, they close."""
        cutoff = (now or utcnow()) - UPLOAD_TTL
        with self.db.write() as session:
            stale = session.scalars(
                select(Upload).where(Upload.status.in_(OPEN_STATES), Upload.created_at < cutoff)
            ).all()
            for upload in stale:
                self._closed(upload.public_id)
                upload.status = UploadStatus.REJECTED.value
                upload.outcome = _rejection_json(
                    "expired", "the upload was not completed in time; open it again", retryable=True
                )
                upload.updated_at = utcnow()
                audit.append(
                    session, "intake", "upload.expire", upload.study_uid, upload=upload.public_id
                )
            names = [u.public_id for u in stale]
            held = set(
                session.scalars(
                    select(UploadFile.sha256).where(UploadFile.upload_id.in_([u.id for u in stale]))
                ).all()
            )
            # Objects only these uploads brought go with them: a site cannot fill the
            # store with files of exams it never completes (registered ones, and
            # uploads still open, keep theirs).
            kept = set(
                session.scalars(
                    select(ExamInstance.sha256).where(ExamInstance.sha256.in_(held))
                ).all()
            ) | set(
                session.scalars(
                    select(UploadFile.sha256)
                    .join(Upload, Upload.id == UploadFile.upload_id)
                    .where(UploadFile.sha256.in_(held), Upload.status.in_(OPEN_STATES))
                ).all()
            )
        for name in names:
            _remove_dir(self.settings.uploads_dir / name)
        for sha256 in sorted(held - kept):
            self.store.delete(sha256)
        self.forget()
        return len(names)

    # -- helpers -------------------------------------------------------------------------

    def _upload(self, session: Session, node: NodeIdentity, upload_id: str) -> Upload:
        upload = session.scalar(select(Upload).where(Upload.public_id == upload_id))
        if upload is None or upload.site_id != node.site_id:
            # Another site's upload is "not found" too: ids are not confirmed to strangers.
            raise CoordinatorError("upload_not_found", f"no upload {upload_id} of this site")
        return upload

    def _receipt(self, session: Session, upload: Upload, duplicate: bool) -> Receipt:
        exam = session.scalar(select(Exam).where(Exam.study_uid == upload.study_uid))
        if exam is None:  # pragma: no cover - registered uploads have their exam
            raise CoordinatorError("not_found", "the exam of this upload is missing")
        site = session.get(Site, exam.site_id)
        return Receipt(
            study_instance_uid=exam.study_uid,
            site=site.name if site else "?",
            instances=exam.instance_count,
            manifest_sha256=exam.manifest_sha256,
            registered_at=exam.registered_at,
            duplicate=duplicate,
        )

    def _public(self, session: Session, upload: Upload) -> UploadPublic:
        files = session.scalars(
            select(UploadFile).where(UploadFile.upload_id == upload.id).order_by(UploadFile.id)
        ).all()
        receipt = rejection = None
        if upload.status == UploadStatus.REGISTERED.value:
            receipt = self._receipt(session, upload, duplicate=False)
        elif upload.outcome:
            rejection = Rejection.model_validate_json(upload.outcome)
        return UploadPublic(
            upload_id=upload.public_id,
            study_instance_uid=upload.study_uid,
            status=UploadStatus(upload.status),
            files=[self._file_state(f, upload.status) for f in files],
            created_at=upload.created_at,
            expires_at=upload.created_at + UPLOAD_TTL,
            receipt=receipt,
            rejection=rejection,
        )

    def _listed(self, upload_id: str) -> tuple[int, dict[str, int]] | None:
        """(site id, {sha256: size}) of an open upload, kept in memory while it is open."""
        with self._guard:
            cached = self._open_uploads.get(upload_id)
        if cached is not None:
            return cached
        with self.db.read() as session:
            found = session.execute(
                select(Upload.id, Upload.site_id, Upload.status).where(
                    Upload.public_id == upload_id
                )
            ).first()
            if found is None or found.status not in OPEN_STATES:
                return None
            files = dict(
                session.execute(
                    select(UploadFile.sha256, UploadFile.size).where(
                        UploadFile.upload_id == found.id
                    )
                ).all()
            )
        entry = (int(found.site_id), {str(k): int(v) for k, v in files.items()})
        with self._guard:
            self._open_uploads[upload_id] = entry
        return entry

    def _closed(self, upload_id: str) -> None:
        with self._guard:
            self._open_uploads.pop(upload_id, None)
            # A request still writing holds its own reference to its lock; a later
            # one finds the upload closed.
            self._locks.pop(upload_id, None)

    def _file_state(self, row: UploadFile, status: str) -> UploadFileState:
        held = row.complete or (status in OPEN_STATES and self.store.exists(row.sha256))
        return UploadFileState(
            sha256=row.sha256,
            size=row.size,
            received=row.size if held else row.received,
            complete=held,
        )

    def _part(self, upload_id: str, sha256: str) -> Path:
        return self.settings.uploads_dir / upload_id / f"{sha256}.part"

    def _lock(self, upload_id: str, sha256: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(upload_id, {}).setdefault(sha256, threading.Lock())

    def forget(self) -> None:
        """Drop the per-file locks no open upload needs (after a sweep; closing drops its own).

        A request on an upload that is not open (closed meanwhile, or never opened)
        may leave an entry behind: these go here.
        """
        with self._guard:
            self._locks = {
                upload_id: locks
                for upload_id, locks in self._locks.items()
                if upload_id in self._open_uploads or any(x.locked() for x in locks.values())
            }


def _ready(_: int) -> bool:
    """A scanning process is up with the scanner loaded."""
    return scan is not None


def check_instance(
    source: str | bytes,
    where: str,
    sop_instance_uid: str,
    expected: dict[str, str],
    options: dict[str, bool],
    site_prefix: str | None,
    threshold: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One instance: its header against the manifest, then the PHI scan (runs in a worker)."""
    try:
        data = Path(source).read_bytes() if isinstance(source, str) else source
    except FileNotFoundError:
        data = b""
    if hashlib.sha256(data).hexdigest() != where.split(" ")[0]:
        damaged = {"code": "object_damaged", "message": "the stored object is damaged"}
        return [{**damaged, "location": where}], []
    reasons: list[dict[str, Any]] = []
    try:
        header = pydicom.dcmread(
            io.BytesIO(data), stop_before_pixels=True, specific_tags=list(expected)
        )
    except (InvalidDicomError, ValueError, EOFError, OSError) as exc:
        return [{"code": "not_dicom", "message": str(exc), "location": where}], []
    for keyword, value in expected.items():
        found = str(header.get(keyword, "") or "")
        if found != value:
            reasons.append(
                {
                    "code": "manifest_mismatch",
                    "message": f"{keyword} in the file is not what the manifest says",
                    "location": where,
                }
            )
    deid = DeidOptions(**options)
    try:
        scanned = scan(data, deid, site_prefix=site_prefix)
    except ValueError:
        scanned = scan(data, deid)
    level = Severity.parse(threshold)
    findings = [
        {
            "source": "coordinator-scan",
            "severity": f.severity.name.lower(),
            "kind": f.kind,
            "location": f.location,
            "message": f.message,
            "excerpt": "",  # nothing of what was found is kept or sent back
            "sop_instance_uid": sop_instance_uid,
        }
        for f in scanned
        if f.severity >= level
    ]
    return reasons, findings


def _same_exam(stored: str, manifest: ExamManifest) -> bool:
    """The same exam, files, labels and clinical values (only when it was packaged differs)."""
    before = ExamManifest.model_validate_json(stored).model_dump(
        mode="json", exclude={"created_at"}
    )
    return before == manifest.model_dump(mode="json", exclude={"created_at"})


def _write_at(part: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset``, dropping anything beyond it first (a chunk never acked)."""
    part.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path) -> None:
    if not path.is_dir():
        return
    for child in path.iterdir():
        child.unlink(missing_ok=True)
    path.rmdir()


def _withdrawn(study_uid: str) -> CoordinatorError:
    return CoordinatorError(
        "exam_withdrawn",
        f"study {study_uid} was withdrawn by its site; a withdrawn exam is not taken again",
    )


def _rejection_json(code: str, message: str, retryable: bool) -> str:
    return Rejection(code=code, message=message, retryable=retryable).model_dump_json()

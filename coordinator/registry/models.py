"""The registry tables. They stay inside the coordinator: the API returns ``protocols`` models.

Sites and their credentials (enrollment tokens, node certificates, API tokens),
the exams sites contributed (series, instances, labels, clinical variables),
uploads in progress, releases, training runs and models, and the audit log.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocols.sqltypes import UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


# -- federation --------------------------------------------------------------------------


class Site(Base):
    """A hospital in the federation."""

    __tablename__ = "sites"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    enrolled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    version: Mapped[str | None] = mapped_column(String(32))
    counts: Mapped[str] = mapped_column(Text, default="{}")
    last_error: Mapped[str | None] = mapped_column(Text)
    #: The site's SuperNode at the Flower SuperLink (a decimal uint64), and the SHA-256
    #: of the public key it was registered with (the key of the site's certificate).
    flower_node_id: Mapped[str | None] = mapped_column(String(24))
    flower_key_sha256: Mapped[str | None] = mapped_column(String(64))


class EnrollmentToken(Base):
    """A one-time, expiring enrollment token (only its hash is kept)."""

    __tablename__ = "enrollment_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class NodeCertificate(Base):
    """A certificate the federation CA issued to a site's node."""

    __tablename__ = "node_certificates"

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    fingerprint: Mapped[str] = mapped_column(String(64), unique=True)
    pem: Mapped[str] = mapped_column(Text)
    not_after: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    issued_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class ApiToken(Base):
    """An operator's or researcher's API token (stored hashed)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


# -- exams -------------------------------------------------------------------------------


class Exam(Base):
    """A de-identified exam (one study) a site contributed."""

    __tablename__ = "exams"
    __table_args__ = (
        Index("ix_exams_site_modality", "site_id", "modality"),
        Index("ix_exams_study_date", "study_date"),
        # Registry search (migration 0002): sorting by registration time, a modality
        # with either sort key, and finding the few withdrawn exams to leave out.
        Index("ix_exams_registered_at", "registered_at"),
        Index("ix_exams_modality_study_date", "modality", "study_date"),
        Index("ix_exams_modality_registered_at", "modality", "registered_at"),
        Index("ix_exams_withdrawn_at", "withdrawn_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pseudonym: Mapped[str] = mapped_column(String(64), index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    #: The exam's modalities, backslash-joined in sorted order (``CT\\SR``).
    modality: Mapped[str] = mapped_column(String(64))
    body_part: Mapped[str | None] = mapped_column(String(64), index=True)
    series_count: Mapped[int] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[str] = mapped_column(Text)
    deid_profile: Mapped[str] = mapped_column(String(32))
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    withdrawn_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    withdrawn_reason: Mapped[str | None] = mapped_column(Text)


class ExamSeries(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str] = mapped_column(String(16), index=True)
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer)


class ExamInstance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class ExamLabel(Base):
    __tablename__ = "labels"
    __table_args__ = (
        UniqueConstraint("exam_id", "scheme", "name", name="uq_exam_label"),
        # Covers search by label and label statistics (migration 0002).
        Index("ix_labels_value_exam", "scheme", "name", "value", "exam_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    scheme: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(200))


class ExamClinical(Base):
    __tablename__ = "clinical_values"
    __table_args__ = (
        UniqueConstraint("exam_id", "variable", name="uq_exam_clinical"),
        # Covers search by clinical value (migration 0002).
        Index("ix_clinical_value_exam", "variable", "value", "exam_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)
    variable: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(200))


# -- uploads -----------------------------------------------------------------------------


class Upload(Base):
    """An upload session: a signed manifest and the files received for it so far."""

    __tablename__ = "uploads"

    id: Mapped[int] = mapped_column(primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"), index=True)
    study_uid: Mapped[str] = mapped_column(String(64), index=True)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    signed_manifest: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: JSON: the rejection (reasons, findings) when the exam was refused.
    outcome: Mapped[str | None] = mapped_column(Text)


class UploadFile(Base):
    __tablename__ = "upload_files"
    __table_args__ = (UniqueConstraint("upload_id", "sha256", name="uq_upload_file"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    upload_id: Mapped[int] = mapped_column(ForeignKey("uploads.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    received: Mapped[int] = mapped_column(BigInteger, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)


# -- releases, training ------------------------------------------------------------------


class Release(Base):
    """An immutable, named set of exams with its manifest."""

    __tablename__ = "releases"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    filters: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str] = mapped_column(String(64))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    exam_count: Mapped[int] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer)


class ReleaseExam(Base):
    __tablename__ = "release_exams"
    __table_args__ = (UniqueConstraint("release_id", "exam_id", name="uq_release_exam"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), index=True)
    exam_id: Mapped[int] = mapped_column(ForeignKey("exams.id"), index=True)


class TrainingRun(Base):
    """A federated training run: what was asked, where Flower runs it, how far it got.

    ``name`` is the run's public id (``run-0001``). Each Flower run that carries it
    (the first, and one per resume) is listed in ``attempts``; ``run_dir`` is where
    the ServerApp writes its outputs, which the coordinator reads into ``training_rounds``
    and ``models``.
    """

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    app: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="created")
    config: Mapped[str] = mapped_column(Text, default="{}")
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    created_by: Mapped[str] = mapped_column(String(64))
    app_hash: Mapped[str] = mapped_column(String(64), default="")
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    flower_run_id: Mapped[str | None] = mapped_column(String(24))
    attempts: Mapped[str] = mapped_column(Text, default="[]")
    run_dir: Mapped[str] = mapped_column(Text, default="")
    degraded: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)


class TrainingRound(Base):
    """One completed round of a run: who trained (samples), declined or dropped; metrics."""

    __tablename__ = "training_rounds"
    __table_args__ = (UniqueConstraint("run_id", "round", name="uq_training_round"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    #: JSON: {"trained": {site: samples}, "declined": [site], "dropped": [site],
    #: "evaluated": {site: samples}}
    participation: Mapped[str] = mapped_column(Text)
    #: JSON: {"train": {...}, "evaluate": {...}, "central": {...}}
    metrics: Mapped[str] = mapped_column(Text)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class Model(Base):
    """A model a training run produced (its weights are an object in the store)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    metrics: Mapped[str] = mapped_column(Text, default="{}")
    #: JSON provenance (sites and samples per round, cohort, app, strategy, privacy).
    provenance: Mapped[str] = mapped_column(Text, default="{}")


# -- audit -------------------------------------------------------------------------------


class AuditEntry(Base):
    """One link of the append-only, hash-chained audit log (``protocols.audit`` format)."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64), index=True)
    subject: Mapped[str] = mapped_column(String(200))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """One row, locked by every writer of the audit log so appends never interleave."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    hash: Mapped[str] = mapped_column(String(64))


# -- what the registry's readers cache --------------------------------------------------


class RegistryGeneration(Base):
    """One row whose ``value`` changes with every write to what registry reads return.

    Database triggers bump it (migration 0004) on any insert, update or delete of
    exams, series, instances, labels and clinical values, and of a site's name: a
    write from any process or code path counts. ``coordinator.registry.cache``
    keys its answers by it. Heartbeats and uploads in progress do not touch it.
    """

    __tablename__ = "registry_generation"

    id: Mapped[int] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)

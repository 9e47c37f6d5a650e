"""The node index tables. They stay inside the node: the API returns ``protocols`` models."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    Boolean,
    Date,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocols.sqltypes import UTCDateTime, utcnow

__all__ = ["UTCDateTime", "utcnow"]  # re-exported: the node's modules import them from here


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """A pseudonymous patient. Originals live only in the encrypted vault."""

    __tablename__ = "patients"

    id: Mapped[int] = mapped_column(primary_key=True)
    pseudonym: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Study(Base):
    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_status_date", "status", "study_date"),
        Index("ix_studies_date", "study_date"),
        Index("ix_studies_received", "received_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    status: Mapped[str] = mapped_column(String(16))
    status_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    modalities: Mapped[str] = mapped_column(String(128), default="")
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    size: Mapped[int] = mapped_column(Integer, default=0)
    burned_in_risk: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (
        Index("ix_series_study", "study_id"),
        Index("ix_series_modality_body", "modality", "body_part"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # The image attributes searches filter on, as the series' first instance has them;
    # ``uniform`` stays true while every instance agrees, so a search can answer from
    # the series alone and look at instances only in the rare mixed series.
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    photometric: Mapped[str | None] = mapped_column(String(16))
    burned_in_risk: Mapped[bool] = mapped_column(Boolean, default=False)
    uniform: Mapped[bool] = mapped_column(Boolean, default=True)


#: The attributes a series summarises for searches (instance column = series column).
SERIES_IMAGE_ATTRIBUTES = (
    "rows",
    "columns",
    "pixel_spacing",
    "slice_thickness",
    "number_of_frames",
    "transfer_syntax",
    "photometric",
    "burned_in_risk",
)


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (
        Index("ix_instances_study", "study_id", "series_id"),
        Index("ix_instances_series", "series_id", "instance_number"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing: Mapped[float | None] = mapped_column(Float)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    photometric: Mapped[str | None] = mapped_column(String(16))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    burned_in_risk: Mapped[bool] = mapped_column(Boolean, default=False)
    risk_reasons: Mapped[str] = mapped_column(Text, default="[]")
    path: Mapped[str] = mapped_column(String(300))
    received_via: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: The newest originals-vault record holding this instance's entry, so reading its
    #: originals decrypts that record alone. None for rows indexed before the index
    #: kept it (migration 0005: a full read of the vault finds them) and for objects
    #: the node made itself (segmentations: they have no entry).
    vault_record: Mapped[int | None] = mapped_column(Integer)


class StatusChange(Base):
    __tablename__ = "status_changes"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class QuarantineEntry(Base):
    """A file that could not be taken in, with why. The source is sealed (it may name people)."""

    __tablename__ = "quarantine"
    __table_args__ = (UniqueConstraint("fingerprint", "code", name="uq_quarantine_source_code"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    #: Keyed digest of the source (path, or content for DICOM pushes): a rerun adds nothing.
    fingerprint: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    code: Mapped[str] = mapped_column(String(32), index=True)
    message: Mapped[str] = mapped_column(Text)
    source_kind: Mapped[str] = mapped_column(String(16))
    source_sealed: Mapped[str] = mapped_column(Text, default="")
    sha256: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(Integer)
    kept_as: Mapped[str | None] = mapped_column(String(300))


class AuditEntry(Base):
    """One link of the append-only, hash-chained audit log (triggers forbid edits)."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(128))
    details: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Finding(Base):
    """Something vetting found in a study: from the PHI scanner, OCR or the coordinator."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    source: Mapped[str] = mapped_column(String(16))
    severity: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    location: Mapped[str] = mapped_column(String(200))
    message: Mapped[str] = mapped_column(Text)
    excerpt: Mapped[str] = mapped_column(String(200), default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    resolved_by: Mapped[str | None] = mapped_column(String(64))


class Review(Base):
    """A reviewer's decision on a study (two of them when the two-person rule is on)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Mask(Base):
    """Rectangles blanked in an instance's pixels, from a device rule or a reviewer."""

    __tablename__ = "masks"

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    rectangles: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(64))
    by: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    recheck_clean: Mapped[bool] = mapped_column(Boolean, default=False)


class Label(Base):
    """An expert label of a study (RICORD appearance, airspace grading, ...)."""

    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("study_id", "scheme", "name", name="uq_label"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    scheme: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(200))
    import_id: Mapped[int] = mapped_column(ForeignKey("imports.id"))


class ClinicalValue(Base):
    """A clinical variable of a study's patient, de-identified (dates shifted)."""

    __tablename__ = "clinical_values"
    __table_args__ = (UniqueConstraint("study_id", "variable", name="uq_clinical"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    variable: Mapped[str] = mapped_column(String(64))
    value: Mapped[str] = mapped_column(String(200))
    import_id: Mapped[int] = mapped_column(ForeignKey("imports.id"))


class ImportRun(Base):
    """One label or clinical import, with what it could not use."""

    __tablename__ = "imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer, default=0)
    matched: Mapped[int] = mapped_column(Integer, default=0)
    report: Mapped[str] = mapped_column(Text, default="{}")


class User(Base):
    """A person who logs in to the node's web UI (reviewer or operator)."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    disabled_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class OutboxEntry(Base):
    """Something the node must tell the coordinator: an approved exam, or a withdrawal.

    An entry is ``queued`` until the sender takes it (``sending``); it ends ``done``
    (receipt or acknowledgement), ``held`` (PHI found by the send-time gate or the
    coordinator: back to review) or ``failed`` (a permanent refusal, shown with its
    reason). A retryable failure puts it back to ``queued`` with a later
    ``next_attempt_at``.
    """

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "state", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_code: Mapped[str] = mapped_column(String(64), default="")
    last_error: Mapped[str] = mapped_column(Text, default="")
    upload_id: Mapped[str | None] = mapped_column(String(64))
    #: ``host:pid`` of the sender working on it, so a dead sender's work is resumed.
    owner: Mapped[str] = mapped_column(String(128), default="")
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    bytes_total: Mapped[int] = mapped_column(Integer, default=0)
    bytes_sent: Mapped[int] = mapped_column(Integer, default=0)
    receipt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class TrainingRunEntry(Base):
    """A federated training run this node was asked to take part in, and its decision.

    Keyed by the RadFed run id (a resumed run keeps its decision); ``status`` is
    ``accepted``, ``declined`` or ``pending`` (manual approval set, no operator
    decision yet). ``app_hash`` is the hash of the app bundle the decision was for;
    a run that later sends another bundle is declined.
    """

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run: Mapped[str] = mapped_column(String(64), unique=True)
    flower_run_id: Mapped[str] = mapped_column(String(24), default="")
    app_hash: Mapped[str] = mapped_column(String(64), default="")
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    decided_by: Mapped[str] = mapped_column(String(64), default="")
    cohort: Mapped[str] = mapped_column(Text, default="{}")
    samples: Mapped[int] = mapped_column(Integer, default=0)
    rounds: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

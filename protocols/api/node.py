"""The node API's wire models: study search, study detail, counts, quarantine, health."""

from __future__ import annotations

import datetime as dt
import re
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StudyStatus(StrEnum):
    """Where a study stands (DESIGN.md, study lifecycle)."""

    RECEIVED = "received"
    DEIDENTIFIED = "deidentified"
    HELD = "held"  # in review
    APPROVED = "approved"
    REJECTED = "rejected"
    QUEUED = "queued"
    SHARED = "shared"
    FAILED = "failed"
    WITHDRAWN = "withdrawn"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class StatusChangePublic(_Model):
    from_status: StudyStatus | None
    to_status: StudyStatus
    actor: str
    reason: str
    at: dt.datetime


class InstancePublic(_Model):
    sop_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    rows: int | None
    columns: int | None
    pixel_spacing: float | None = Field(description="row spacing, mm")
    slice_thickness: float | None
    number_of_frames: int | None
    transfer_syntax: str
    photometric_interpretation: str | None
    size: int
    sha256: str
    burned_in_risk: bool
    risk_reasons: list[str]
    received_via: str
    received_at: dt.datetime


class SeriesPublic(_Model):
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    manufacturer: str | None
    model: str | None
    series_number: int | None
    instance_count: int
    instances: list[InstancePublic] = Field(default_factory=list)


class StudySummary(_Model):
    study_instance_uid: str
    pseudonym: str
    study_date: dt.date | None = Field(description="shifted with the patient's date shift")
    status: StudyStatus
    status_at: dt.datetime
    modalities: list[str]
    series_count: int
    instance_count: int
    size: int
    burned_in_risk: bool
    received_at: dt.datetime


class StudyPage(_Model):
    items: list[StudySummary]
    total: int
    limit: int
    offset: int


class LabelPublic(_Model):
    """An expert label imported for the study (RICORD schema)."""

    scheme: str = Field(description="e.g. cxr_appearance, airspace_grade")
    name: str
    value: str


class StudyDetail(StudySummary):
    series: list[SeriesPublic]
    history: list[StatusChangePublic]
    labels: list[LabelPublic] = Field(default_factory=list)
    clinical: dict[str, str] = Field(
        default_factory=dict,
        description="clinical variables, de-identified (dates shifted with the patient)",
    )


class Counts(_Model):
    studies: int
    instances: int
    by_status: dict[str, int]
    by_modality: dict[str, int] = Field(description="instances per modality")
    quarantined: int


class QuarantinePublic(_Model):
    id: int
    at: dt.datetime
    code: str
    message: str
    source_kind: str
    sha256: str | None
    size: int | None


class QuarantinePage(_Model):
    items: list[QuarantinePublic]
    total: int
    limit: int
    offset: int


class Health(_Model):
    status: str
    version: str
    protocol_version: str
    dicom_listener: bool
    pending_instances: int = Field(
        description="received over DICOM, acknowledged, not yet taken in"
    )


class ReviewRequest(_Model):
    """An approval or rejection; a rejection needs a reason."""

    reason: str = Field(default="", max_length=2000)


class ReviewResult(_Model):
    status: StudyStatus
    message: str


class FindingPublic(_Model):
    source: str
    severity: str
    kind: str
    location: str
    message: str
    excerpt: str


class OutboxEntryPublic(_Model):
    """One message of the node's outbox: an approved exam or a withdrawal."""

    study_instance_uid: str
    kind: str = Field(description='"exam" or "withdrawal"')
    state: str = Field(description="queued, sending, done, held or failed")
    attempts: int
    next_attempt_at: dt.datetime
    bytes_sent: int
    bytes_total: int
    last_code: str
    last_error: str
    updated_at: dt.datetime


class TrainingPolicyBody(BaseModel):
    """The site's training policy: the app bundles it runs and the exams they may read."""

    model_config = ConfigDict(extra="forbid")

    apps: list[str] = Field(
        default_factory=list, description="SHA-256 of each Flower app bundle (FAB) allowed"
    )
    manual_approval: bool = Field(False, description="every run waits for an operator")
    eligible: Literal["approved", "shared"] = Field(
        "approved", description="approved (incl. queued and shared) or shared exams only"
    )

    @field_validator("apps")
    @classmethod
    def _hashes(cls, values: list[str]) -> list[str]:
        cleaned: list[str] = []
        for value in values:
            digest = value.strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{value!r} is not an app bundle SHA-256 (64 hex digits)")
            if digest not in cleaned:
                cleaned.append(digest)
        return cleaned


class TrainingRunPublic(_Model):
    """A training run this node was asked to join, and its decision."""

    run: str
    status: str = Field(description="accepted, declined or pending")
    reason: str
    decided_by: str
    app_hash: str
    flower_run_id: str
    samples: int = Field(description="samples its manifest offered")
    rounds: int = Field(description="training rounds done here")
    cohort: dict[str, object]


class TrainingDecision(_Model):
    reason: str = Field(default="", max_length=2000)

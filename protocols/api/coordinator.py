"""The coordinator API's wire models: contributions, uploads, heartbeats, sites, registry.

A node contributes an exam as an ``ExamManifest`` signed with its key
(``SignedManifest``, see ``protocols.signing``), opens an upload with it
(``UploadCreate``), sends the files and gets a ``Receipt`` or a ``Rejection``.
Inbound models (what a node sends) are frozen and refuse unknown fields, so a
signed manifest means exactly what its signer saw; outbound models follow the
node API's style.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from protocols.api.errors import ErrorBody
from protocols.api.node import FindingPublic
from protocols.deid.options import TABLE_COLUMNS, DeidOptions

#: A DICOM UID (PS3.5 9.1): numeric components without leading zeros, dot-separated.
Uid = Annotated[
    str,
    Field(
        max_length=64,
        pattern=r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$",
        description="DICOM UID: digits and dots, at most 64 characters",
    ),
]
#: A SHA-256 digest as 64 lowercase hex digits.
Sha256 = Annotated[
    str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256, 64 lowercase hex digits")
]
#: A site's name in the federation.
SiteName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description='1-64 characters of letters, digits, ".", "_" and "-"',
    ),
]
#: A dotted version such as ``1.1`` or ``2025.1``.
Version = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)+$")]


def _in_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


#: A timezone-aware instant, kept in UTC: one spelling per instant, so a manifest's
#: canonical bytes survive a JSON round trip.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_in_utc)]
#: A DICOM code string such as a modality (CS, at most 16 characters).
Code = Annotated[str, Field(min_length=1, max_length=16)]


class _Inbound(BaseModel):
    """What a node sends: frozen, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _Public(BaseModel):
    """What the coordinator returns."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


# --- the manifest ------------------------------------------------------------------------------


class InstanceEntry(_Inbound):
    """One de-identified file of the exam."""

    sop_instance_uid: Uid
    sop_class_uid: Uid
    size: int = Field(gt=0, description="bytes")
    sha256: Sha256


class SeriesEntry(_Inbound):
    series_instance_uid: Uid
    modality: Code
    body_part: str | None = Field(default=None, max_length=64)
    series_number: int | None = None
    instances: list[InstanceEntry] = Field(min_length=1)


class ExamEntry(_Inbound):
    """The study, as the node's de-identification left it."""

    pseudonym: str = Field(
        min_length=1,
        max_length=64,
        description='the patient\'s pseudonym at the site, e.g. "SITE-7K2M4Q9X1ABC"',
    )
    study_instance_uid: Uid = Field(description="de-identified")
    study_date: dt.date | None = Field(
        default=None, description="shifted with the patient's date shift"
    )
    modalities: list[Code] = Field(min_length=1)
    body_part: str | None = Field(default=None, max_length=64)
    series: list[SeriesEntry] = Field(min_length=1)


class DeidRecord(_Inbound):
    """The de-identification profile version and every option's state when it ran."""

    profile_version: Version = Field(description="protocols.version.DEID_PROFILE_VERSION")
    options: dict[str, bool] = Field(
        description="every option of protocols.deid.options.DeidOptions, on or off"
    )

    @field_validator("options")
    @classmethod
    def _every_option(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(value) - set(TABLE_COLUMNS))
        missing = sorted(set(TABLE_COLUMNS) - set(value))
        if unknown or missing:
            raise ValueError(
                f"options must name every profile option once; unknown: {unknown}, "
                f"missing: {missing}"
            )
        try:
            DeidOptions(**value)
        except ValidationError as exc:
            problems = "; ".join(
                error["msg"].removeprefix("Value error, ") for error in exc.errors()
            )
            raise ValueError(f"contradictory options: {problems}") from None
        return value

    @classmethod
    def of(cls, options: DeidOptions, profile_version: str) -> DeidRecord:
        """Record ``options`` as applied under ``profile_version``."""
        return cls(profile_version=profile_version, options=options.model_dump())

    def to_options(self) -> DeidOptions:
        """The options as the de-identifier's own model."""
        return DeidOptions(**self.options)


class LabelEntry(_Inbound):
    """An expert label of the exam (RICORD schema)."""

    scheme: str = Field(min_length=1, max_length=128, description="e.g. cxr_appearance")
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(max_length=1024)


class ExamManifest(_Inbound):
    """What a site contributes: one de-identified exam, its files, labels and clinical data.

    Instance and series UIDs and file digests are unique across the manifest; a
    manifest holds at least one instance. ``protocols.signing`` signs and checks it.
    """

    protocol_version: Version
    site: SiteName
    exam: ExamEntry
    deid: DeidRecord
    labels: list[LabelEntry] = Field(default_factory=list)
    clinical: dict[str, str] = Field(
        default_factory=dict,
        description="clinical variables, de-identified (dates shifted with the patient)",
    )
    created_at: UtcDatetime

    @model_validator(mode="after")
    def _unique(self) -> ExamManifest:
        for what, values in (
            ("series_instance_uid", [s.series_instance_uid for s in self.exam.series]),
            ("sop_instance_uid", [i.sop_instance_uid for i in self.instances()]),
            ("sha256", [i.sha256 for i in self.instances()]),
        ):
            seen: set[str] = set()
            for value in values:
                if value in seen:
                    raise ValueError(f"{what} {value} appears more than once in the manifest")
                seen.add(value)
        return self

    @property
    def study_instance_uid(self) -> str:
        return self.exam.study_instance_uid

    def instances(self) -> Iterator[InstanceEntry]:
        """Every instance, series by series."""
        for series in self.exam.series:
            yield from series.instances

    def files(self) -> dict[str, InstanceEntry]:
        """The instances by sha256, the key uploads and the object store use."""
        return {instance.sha256: instance for instance in self.instances()}

    @property
    def instance_count(self) -> int:
        return sum(len(series.instances) for series in self.exam.series)

    @property
    def total_size(self) -> int:
        """Bytes of every file together."""
        return sum(instance.size for instance in self.instances())


class SignedManifest(_Inbound):
    """A manifest with the node's signature over its canonical bytes."""

    manifest: ExamManifest
    signature: str = Field(
        min_length=4,
        max_length=512,
        pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="base64 of the DER-encoded signature",
    )
    signer_fingerprint: Sha256 = Field(description="SHA-256 of the signer's DER certificate")
    algorithm: str = Field(max_length=64, description='e.g. "ecdsa-p384-sha384"')


# --- uploads -----------------------------------------------------------------------------------


class UploadStatus(StrEnum):
    OPEN = "open"  # files still arriving
    COMPLETE = "complete"  # every file in, being checked
    REGISTERED = "registered"
    REJECTED = "rejected"
    QUARANTINED = "quarantined"  # PHI found on the coordinator's scan


class UploadCreate(_Inbound):
    """Open an upload session for a signed manifest (idempotent per manifest)."""

    signed: SignedManifest


class UploadFileState(_Public):
    sha256: Sha256
    size: int = Field(gt=0)
    received: int = Field(ge=0, description="bytes received so far")
    complete: bool = Field(description="every byte in and the digest checked")

    @model_validator(mode="after")
    def _within_size(self) -> UploadFileState:
        if self.received > self.size:
            raise ValueError(f"received ({self.received}) exceeds size ({self.size})")
        return self


class UploadPublic(_Public):
    upload_id: str
    study_instance_uid: Uid
    status: UploadStatus
    files: list[UploadFileState]
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    receipt: Receipt | None = Field(default=None, description="once registered")
    rejection: Rejection | None = Field(
        default=None, description="once rejected or quarantined: why"
    )

    def missing(self) -> list[UploadFileState]:
        """Files the node still has to send (or finish sending)."""
        return [f for f in self.files if not f.complete]


class Receipt(_Public):
    """The coordinator registered the exam; the node may mark it shared."""

    study_instance_uid: Uid
    site: SiteName
    instances: int = Field(ge=0, description="instances registered")
    manifest_sha256: Sha256 = Field(description="SHA-256 of the manifest's canonical bytes")
    registered_at: dt.datetime
    duplicate: bool = Field(
        default=False, description="the same manifest was registered before; nothing changed"
    )


class RejectionReason(_Public):
    code: str = Field(description='e.g. "sha256_mismatch", "bad_signature"')
    message: str
    location: str | None = Field(default=None, description="a file's sha256, a field path")


class ExamFinding(FindingPublic):
    """A PHI finding of the coordinator's scan, with the instance it is in."""

    sop_instance_uid: Uid | None = None


class Rejection(ErrorBody):
    """Why the coordinator refused an upload; ``retryable`` says whether sending again helps."""

    model_config = ConfigDict(frozen=True, from_attributes=True)

    reasons: list[RejectionReason] = Field(default_factory=list)
    findings: list[ExamFinding] = Field(default_factory=list)


# --- heartbeats, sites, enrollment -------------------------------------------------------------


class Heartbeat(_Inbound):
    """A node's periodic report: versions, studies by state, the last error."""

    software_version: str = Field(min_length=1, max_length=64)
    protocol_version: Version
    counts: dict[str, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, description="studies by status"
    )
    last_error: str | None = Field(default=None, max_length=2000)
    sent_at: UtcDatetime


class SiteStatus(StrEnum):
    PENDING = "pending"  # token issued, not enrolled yet
    ACTIVE = "active"
    REVOKED = "revoked"


class SiteHealth(StrEnum):
    OK = "ok"
    STALE = "stale"  # no heartbeat for a while
    ERROR = "error"  # the last heartbeat reported an error
    NEVER = "never"  # no heartbeat yet


class SitePublic(_Public):
    name: SiteName
    status: SiteStatus
    enrolled_at: dt.datetime | None = Field(default=None, description="None while pending")
    last_seen: dt.datetime | None = None
    health: SiteHealth
    version: str | None = Field(default=None, description="the node's software version")
    counts: dict[str, int] = Field(default_factory=dict, description="studies by status")
    last_error: str | None = None


class EnrollRequest(_Inbound):
    """A site's one-time token and its certificate signing request."""

    token: str = Field(min_length=8, max_length=512, repr=False)
    csr_pem: str = Field(
        max_length=16384,
        pattern=r"^\s*-----BEGIN CERTIFICATE REQUEST-----",
        description="PEM-encoded PKCS#10 request for the node's EC P-384 key",
    )


class EnrollResponse(_Public):
    site: SiteName
    certificate_pem: str
    ca_certificate_pem: str
    superlink: str | None = Field(
        None,
        description="host:port of the federation's Flower SuperLink (Fleet API, TLS), "
        "which the node's SuperNode connects to with the same key",
    )


# --- registry views ----------------------------------------------------------------------------


class ExamSummary(_Public):
    study_instance_uid: Uid
    site: SiteName
    pseudonym: str
    study_date: dt.date | None = Field(description="shifted with the patient's date shift")
    modalities: list[str]
    body_part: str | None
    series_count: int
    instance_count: int
    size: int = Field(description="bytes")
    registered_at: dt.datetime
    withdrawn_at: dt.datetime | None = Field(
        default=None, description="when its site withdrew it; None while it is available"
    )


class ExamDetail(ExamSummary):
    series: list[SeriesEntry]
    labels: list[LabelEntry] = Field(default_factory=list)
    clinical: dict[str, str] = Field(default_factory=dict)
    deid: DeidRecord
    manifest_sha256: Sha256


class ExamPage(_Public):
    items: list[ExamSummary]
    total: int
    limit: int
    offset: int


class StatsRow(_Public):
    key: str
    count: int | None = Field(description="None when suppressed (below k)")
    display: str = Field(description='the count, or "<k" when suppressed')


class StatsTable(_Public):
    """Counts of exams along one dimension, small cells suppressed below ``k``."""

    dimension: str = Field(description='e.g. "site", "modality", "label:cxr_appearance"')
    rows: list[StatsRow]
    k: int = Field(ge=1)

    @classmethod
    def of(
        cls, dimension: str, counts: Mapping[str, int], k: int, *, suppress: bool = True
    ) -> StatsTable:
        """Rows by key; a count from 1 to ``k - 1`` is shown as ``<k`` unless not ``suppress``.

        Operators see exact counts (``suppress=False``); researchers see suppressed ones.
        """
        rows = [
            StatsRow(key=key, count=None, display=f"<{k}")
            if suppress and 0 < count < k
            else StatsRow(key=key, count=count, display=str(count))
            for key, count in sorted(counts.items())
        ]
        return cls(dimension=dimension, rows=rows, k=k)


# --- registry search, releases, withdrawal -----------------------------------------------------

#: A label condition ``scheme:name=value``: the exam has that label with that value.
LabelCondition = Annotated[
    str,
    Field(
        max_length=1500,
        pattern=r"^[^:=]+:[^=]+=.*$",
        description='"scheme:name=value", e.g. "cxr_appearance:typical=yes"',
    ),
]
#: A clinical condition ``variable=value``: the exam's clinical variable has that value.
ClinicalCondition = Annotated[
    str,
    Field(max_length=300, pattern=r"^[^=]+=.*$", description='"variable=value", e.g. "sex=F"'),
]
#: A release's name; it names the release's folder too.
ReleaseName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description='1-64 characters of letters, digits, ".", "_" and "-"',
    ),
]


class ExamFilters(_Inbound):
    """Which exams a search or a release takes; every condition given must hold.

    Study dates are the de-identified ones, shifted per patient by the site's
    date shift: a date range selects on shifted dates, so it is approximate
    across patients (exact only for intervals within one patient).
    """

    site: SiteName | None = None
    modality: Code | None = Field(
        default=None, description="an exam matches if any of its modalities is this one"
    )
    body_part: str | None = Field(default=None, min_length=1, max_length=64)
    labels: list[LabelCondition] = Field(default_factory=list, description="all must hold")
    clinical: list[ClinicalCondition] = Field(default_factory=list, description="all must hold")
    study_date_from: dt.date | None = Field(default=None, description="inclusive, shifted date")
    study_date_to: dt.date | None = Field(default=None, description="inclusive, shifted date")

    @model_validator(mode="after")
    def _ordered_dates(self) -> ExamFilters:
        if (
            self.study_date_from is not None
            and self.study_date_to is not None
            and self.study_date_from > self.study_date_to
        ):
            raise ValueError("study_date_from is after study_date_to")
        return self


class ExamSort(StrEnum):
    STUDY_DATE = "study_date"
    REGISTERED_AT = "registered_at"


class SortOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


class ReleaseCreate(_Inbound):
    """Freeze the exams matching ``filters`` (withdrawn ones never) into a named release."""

    name: ReleaseName
    filters: ExamFilters = Field(default_factory=ExamFilters)
    export: bool = Field(
        default=True, description="also write its folder under the coordinator's releases dir"
    )


class ReleasePublic(_Public):
    name: ReleaseName
    created_at: dt.datetime
    created_by: str
    filters: ExamFilters
    manifest_sha256: Sha256 = Field(description="SHA-256 of the release's manifest.json")
    exam_count: int = Field(ge=0)
    instance_count: int = Field(ge=0)
    withdrawn: list[Uid] = Field(
        default_factory=list,
        description="its exams that their sites withdrew since; the release still holds them",
    )


class ReleaseDiff(_Public):
    """Exams of release ``b`` that ``a`` lacks (added) and of ``a`` that ``b`` lacks (removed)."""

    a: ReleaseName
    b: ReleaseName
    added: list[Uid]
    removed: list[Uid]
    unchanged: int = Field(ge=0, description="exams in both")


class ReleaseFile(_Public):
    """One file of a release: its path in the release folder and its digest."""

    path: str = Field(description="<pseudonym>/<study uid>/<series uid>/<sop uid>.dcm")
    sha256: Sha256
    size: int = Field(gt=0, description="bytes")


class ReleaseExamEntry(_Public):
    """One exam of a release, with its labels, clinical variables and files."""

    study_instance_uid: Uid
    pseudonym: str
    site: SiteName
    study_date: dt.date | None = Field(description="shifted with the patient's date shift")
    modalities: list[str]
    body_part: str | None
    exam_manifest_sha256: Sha256 = Field(description="of the manifest the site signed")
    labels: list[LabelEntry] = Field(default_factory=list)
    clinical: dict[str, str] = Field(default_factory=dict)
    files: list[ReleaseFile]


class ReleaseManifest(_Public):
    """A release's ``manifest.json``: what it holds, file by file; its SHA-256 names it."""

    format: str = Field(default="radfed-release/1", description="this document's format")
    name: ReleaseName
    created_at: dt.datetime
    filters: ExamFilters
    exam_count: int = Field(ge=0)
    instance_count: int = Field(ge=0)
    exams: list[ReleaseExamEntry]


class WithdrawRequest(_Inbound):
    """A site withdraws one of its exams: it leaves search, statistics and later releases."""

    reason: str = Field(min_length=1, max_length=2000)


class ExamWithdrawn(_Public):
    study_instance_uid: Uid
    withdrawn_at: dt.datetime
    releases: list[ReleaseName] = Field(
        default_factory=list, description="earlier releases that still hold it"
    )

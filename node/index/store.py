"""Index operations: record what intake produced, and answer the API's questions.

Recording is idempotent: an instance already indexed with the same content is a
no-op, so a rerun after a crash converges on the index one clean run gives. A
file that could not be taken in is recorded once per (source, reason) with its
source sealed — file names may carry names and MRNs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    and_,
    exists,
    func,
    or_,
    select,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from node.deid.runner import FileOutcome, InstanceInfo
from node.deid.vault import Vault
from node.errors import NodeError
from node.index import audit
from node.index.db import Database
from node.index.lifecycle import transition
from node.index.models import (
    ApiToken,
    ClinicalValue,
    Instance,
    Label,
    OutboxEntry,
    Patient,
    QuarantineEntry,
    Series,
    StatusChange,
    Study,
    utcnow,
)
from protocols.api.node import (
    Counts,
    InstancePublic,
    LabelPublic,
    OutboxEntryPublic,
    QuarantinePage,
    QuarantinePublic,
    SeriesPublic,
    StatusChangePublic,
    StudyDetail,
    StudyPage,
    StudyStatus,
    StudySummary,
)

S = StudyStatus
#: A study that receives instances after a decision goes back to be vetted again.
REOPEN_ON_NEW_INSTANCES = frozenset({S.HELD, S.APPROVED, S.REJECTED, S.QUEUED, S.FAILED, S.SHARED})
SORTS = {
    "study_date": Study.study_date,
    "received_at": Study.received_at,
    "status_at": Study.status_at,
}
ROLES = ("operator", "reviewer")
#: How instances the node makes itself are recorded (segmentations of imported labels):
#: made from de-identified data, they have no entry in the originals vault.
VIA_ANNOTATION = "annotation"


# Intake's statements, written once: building them per instance costs more than running them.
_STUDY_BY_UID = "SELECT id, status, modalities FROM studies WHERE study_uid = ?"
_SERIES_BY_UID = (
    "SELECT id, uniform, rows, columns, pixel_spacing, slice_thickness, number_of_frames, "
    "transfer_syntax, photometric, burned_in_risk FROM series WHERE series_uid = ?"
)
_INSERT_SERIES = (
    "INSERT INTO series (series_uid, study_id, modality, body_part, manufacturer, model, "
    "series_number, instance_count, uniform, rows, columns, pixel_spacing, slice_thickness, "
    "number_of_frames, transfer_syntax, photometric, burned_in_risk) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, 1, 1, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
)
_UPDATE_SERIES = "UPDATE series SET instance_count = instance_count + 1, uniform = ? WHERE id = ?"
_INSERT_INSTANCE = (
    "INSERT INTO instances (sop_uid, series_id, study_id, sop_class_uid, instance_number, size, "
    "sha256, risk_reasons, path, received_via, received_at, rows, columns, pixel_spacing, "
    "slice_thickness, number_of_frames, transfer_syntax, photometric, burned_in_risk, "
    "vault_record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSTANCE_BY_UID = "SELECT sha256, vault_record FROM instances WHERE sop_uid = ?"
_SET_VAULT_RECORD = "UPDATE instances SET vault_record = ? WHERE sop_uid = ?"
_UPDATE_STUDY = (
    "UPDATE studies SET instance_count = instance_count + 1, series_count = series_count + ?, "
    "size = size + ?, burned_in_risk = burned_in_risk OR ?, modalities = ?, updated_at = ? "
    "WHERE id = ?"
)


def _stamp(moment: dt.datetime) -> str:
    """A UTC moment as the index stores it (what UTCDateTime writes)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass
class Recorded:
    """What recording a batch did."""

    instances: int = 0
    unchanged: int = 0
    quarantined: int = 0
    studies_created: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StudyQuery:
    """Filters of a study search: a study matches when one of its instances does."""

    status: tuple[StudyStatus, ...] = ()
    pseudonym: str | None = None
    modality: str | None = None
    body_part: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    study_date_from: dt.date | None = None
    study_date_to: dt.date | None = None
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_min: float | None = None
    pixel_spacing_max: float | None = None
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    number_of_frames_min: int | None = None
    transfer_syntax: str | None = None
    photometric: str | None = None
    burned_in_risk: bool | None = None
    sort: str = "study_date"
    order: Literal["asc", "desc"] = "desc"
    limit: int = 50
    offset: int = 0


#: The largest integer SQLite can bind: a filter or offset past it cannot even be compared.
SQL_INT_MAX = 2**63 - 1


def _check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= 500 or not 0 <= offset <= SQL_INT_MAX:
        raise NodeError(
            "bad_page", f'Argument "limit" must be 1..500 and "offset" 0..{SQL_INT_MAX}.'
        )


def _parse_date(value: object) -> dt.date | None:
    text = str(value or "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return dt.date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def _text(attributes: dict[str, Any], key: str) -> str | None:
    value = attributes.get(key)
    return None if value is None else str(value)[:64]


def _number(attributes: dict[str, Any], key: str, kind: type) -> Any:
    value = attributes.get(key)
    return kind(value) if isinstance(value, (int, float)) else None


class NodeIndex:
    """The index of one node home."""

    def __init__(self, db: Database, vault: Vault) -> None:
        self.db = db
        self.vault = vault

    # -- recording ---------------------------------------------------------------------

    def record(self, outcomes: Iterable[FileOutcome], via: str, actor: str) -> Recorded:
        """Record a batch of intake outcomes in one transaction."""
        done = Recorded()
        with self.db.write() as session:
            for outcome in outcomes:
                if outcome.status in ("written", "unchanged") and outcome.instance is not None:
                    self._record_instance(session, outcome, outcome.instance, via, actor, done)
                elif outcome.status in ("quarantined", "failed"):
                    self._quarantine(session, outcome, via, actor, done)
        return done

    def _record_instance(
        self,
        session: Session,
        outcome: FileOutcome,
        info: InstanceInfo,
        via: str,
        actor: str,
        done: Recorded,
    ) -> None:
        # The hot path of intake (a C-STORE waits on it): plain statements, no ORM
        # loading, except where a status changes.
        sql = session.connection().exec_driver_sql
        existing = sql(_INSTANCE_BY_UID, (info.sop_instance_uid,)).first()
        if existing is not None:
            sha256, held = existing
            newer = outcome.vault_record
            if newer is not None and (held is None or held < newer):
                # The same instance again (a rerun, a resent C-STORE, a conflicting
                # file): its entry went to a newer record too. Readers take an
                # instance's newest entry, as a read of the whole vault does, and the
                # appenders may record out of order: the newest record wins.
                sql(_SET_VAULT_RECORD, (newer, info.sop_instance_uid))
            if sha256 == info.sha256:
                done.unchanged += 1
                return
            # The store refuses to overwrite, so this only happens when the index and
            # the store disagree; record it rather than lose either side.
            self._add_quarantine(
                session,
                "conflict",
                f"instance {info.sop_instance_uid} already indexed with "
                "different content: nothing overwritten",
                via,
                self.vault.fingerprint(f"conflict:{info.sop_instance_uid}:{info.sha256}"),
                outcome,
                actor,
                done,
            )
            return
        attrs = info.attributes
        now = utcnow()
        patient_id = self._patient_id(session, info.pseudonym)
        row = sql(_STUDY_BY_UID, (info.study_instance_uid,)).first()
        if row is None:
            study = Study(
                study_uid=info.study_instance_uid,
                patient_id=patient_id,
                study_date=_parse_date(attrs.get("study_date")),
                status="",
                status_at=now,
                received_at=now,
                updated_at=now,
                modalities="",
                series_count=0,
                instance_count=0,
                size=0,
                burned_in_risk=False,
            )
            transition(session, study, S.RECEIVED, f"intake:{via}", f"received via {via}")
            transition(session, study, S.DEIDENTIFIED, "engine", "de-identified")
            done.studies_created.append(study.study_uid)
            study_id, modalities = study.id, ""
        else:
            study_id, status, modalities = row
            if S(status) in REOPEN_ON_NEW_INSTANCES:
                reopened = session.get(Study, study_id)
                if reopened is not None:
                    transition(
                        session,
                        reopened,
                        S.DEIDENTIFIED,
                        "engine",
                        "new instances received after a decision: to be vetted again",
                    )
        image = (
            _number(attrs, "rows", int),
            _number(attrs, "columns", int),
            _number(attrs, "pixel_spacing", float),
            _number(attrs, "slice_thickness", float),
            _number(attrs, "number_of_frames", int),
            info.transfer_syntax,
            _text(attrs, "photometric"),
            int(bool(outcome.risk)),
        )
        stamp = _stamp(now)
        series = sql(_SERIES_BY_UID, (info.series_instance_uid,)).first()
        new_series = series is None
        if series is None:
            series_id = sql(
                _INSERT_SERIES,
                (
                    info.series_instance_uid,
                    study_id,
                    _text(attrs, "modality"),
                    _text(attrs, "body_part"),
                    _text(attrs, "manufacturer"),
                    _text(attrs, "model"),
                    _number(attrs, "series_number", int),
                    *image,
                ),
            ).scalar_one()
        else:
            series_id = series[0]
            uniform = bool(series[1]) and tuple(series[2:]) == image
            sql(_UPDATE_SERIES, (int(uniform), series_id))
        sql(
            _INSERT_INSTANCE,
            (
                info.sop_instance_uid,
                series_id,
                study_id,
                info.sop_class_uid,
                _number(attrs, "instance_number", int),
                outcome.bytes_out,
                info.sha256,
                json.dumps(outcome.risk),
                outcome.output,
                via,
                stamp,
                *image,
                outcome.vault_record,
            ),
        )
        modality = _text(attrs, "modality")
        if modality:
            modalities = "\\".join(sorted(set(filter(None, modalities.split("\\"))) | {modality}))
        sql(
            _UPDATE_STUDY,
            (
                1 if new_series else 0,
                outcome.bytes_out,
                int(bool(outcome.risk)),
                modalities,
                stamp,
                study_id,
            ),
        )
        done.instances += 1

    @staticmethod
    def _masked(session: Session, path: str) -> bool:
        sql = session.connection().exec_driver_sql
        return (
            sql(
                "SELECT 1 FROM masks JOIN instances ON instances.id = masks.instance_id "
                "WHERE instances.path = ? LIMIT 1",
                (path,),
            ).first()
            is not None
        )

    def _patient_id(self, session: Session, pseudonym: str) -> int:
        sql = session.connection().exec_driver_sql
        found = sql("SELECT id FROM patients WHERE pseudonym = ?", (pseudonym,)).scalar()
        if found is not None:
            return int(found)
        return int(
            sql(
                "INSERT INTO patients (pseudonym, created_at) VALUES (?, ?) RETURNING id",
                (pseudonym, _stamp(utcnow())),
            ).scalar_one()
        )

    def _quarantine(
        self, session: Session, outcome: FileOutcome, via: str, actor: str, done: Recorded
    ) -> None:
        code = outcome.code or "unknown"
        if code == "conflict" and outcome.output and self._masked(session, outcome.output):
            # The stored copy differs because a reviewer or a device rule masked it:
            # the source is the one already taken in, and the masked copy stands.
            outcome.status, outcome.code = "unchanged", ""
            outcome.reason = "masked after intake; the masked copy is kept"
            done.unchanged += 1
            return
        self._add_quarantine(
            session,
            code,
            outcome.reason,
            via,
            self.vault.fingerprint(f"{via}:{outcome.source}"),
            outcome,
            actor,
            done,
        )

    def _add_quarantine(
        self,
        session: Session,
        code: str,
        message: str,
        via: str,
        fingerprint: str,
        outcome: FileOutcome,
        actor: str,
        done: Recorded,
    ) -> None:
        statement = (
            sqlite_insert(QuarantineEntry)
            .values(
                fingerprint=fingerprint,
                at=utcnow(),
                code=code,
                message=message,
                source_kind=via,
                source_sealed=self.vault.seal(outcome.source),
                sha256=None,
                size=outcome.bytes_in or None,
                kept_as=None,
            )
            .on_conflict_do_nothing(index_elements=["fingerprint", "code"])
        )
        if session.execute(statement).rowcount:  # type: ignore[attr-defined]
            audit.append(session, actor, "quarantine", code, via=via, message=message)
            done.quarantined += 1

    # -- status ---------------------------------------------------------------------------

    def move(self, study_uid: str, target: StudyStatus, actor: str, reason: str) -> None:
        """A status change asked for by a person or a policy (API, CLI)."""
        with self.db.write() as session:
            study = session.scalar(select(Study).where(Study.study_uid == study_uid))
            if study is None:
                raise NodeError("study_not_found", f"no study {study_uid} in this node's index")
            transition(session, study, target, actor, reason)

    # -- reading ------------------------------------------------------------------------------

    def _summary(self, study: Study, pseudonym: str) -> dict[str, Any]:
        return {
            "study_instance_uid": study.study_uid,
            "pseudonym": pseudonym,
            "study_date": study.study_date,
            "status": study.status,
            "status_at": study.status_at,
            "modalities": [m for m in study.modalities.split("\\") if m],
            "series_count": study.series_count,
            "instance_count": study.instance_count,
            "size": study.size,
            "burned_in_risk": study.burned_in_risk,
            "received_at": study.received_at,
        }

    def search(self, query: StudyQuery) -> StudyPage:
        """Studies matching the filters, sorted and paginated."""
        if query.sort not in SORTS:
            raise NodeError("bad_sort", f'Argument "sort" must be one of {", ".join(SORTS)}.')
        _check_page(query.limit, query.offset)
        for name in ("rows", "columns", "number_of_frames_min"):
            value = getattr(query, name)
            if value is not None and not -SQL_INT_MAX <= value <= SQL_INT_MAX:
                raise NodeError(
                    "bad_filter", f'Argument "{name}" must be from {-SQL_INT_MAX} to {SQL_INT_MAX}.'
                )
        conditions = _conditions(query)
        order = SORTS[query.sort]
        ordering = (
            (order.desc(), Study.id.desc())
            if query.order == "desc"
            else (order.asc(), Study.id.asc())
        )
        with self.db.read() as session:
            total = session.scalar(select(func.count(Study.id)).where(*conditions)) or 0
            rows = session.execute(
                select(Study, Patient.pseudonym)
                .join(Patient, Patient.id == Study.patient_id)
                .where(*conditions)
                .order_by(*ordering)
                .limit(query.limit)
                .offset(query.offset)
            ).all()
            items = [StudySummary.model_validate(self._summary(s, p)) for s, p in rows]
        return StudyPage(items=items, total=total, limit=query.limit, offset=query.offset)

    def study(self, study_uid: str) -> StudyDetail:
        with self.db.read() as session:
            row = session.execute(
                select(Study, Patient.pseudonym)
                .join(Patient, Patient.id == Study.patient_id)
                .where(Study.study_uid == study_uid)
            ).first()
            if row is None:
                raise NodeError("study_not_found", f"no study {study_uid} in this node's index")
            study, pseudonym = row
            series_rows = session.scalars(
                select(Series).where(Series.study_id == study.id).order_by(Series.series_number)
            ).all()
            instances = session.scalars(
                select(Instance)
                .where(Instance.study_id == study.id)
                .order_by(Instance.series_id, Instance.instance_number, Instance.id)
            ).all()
            by_series: dict[int, list[InstancePublic]] = {}
            for inst in instances:
                by_series.setdefault(inst.series_id, []).append(_instance_public(inst))
            series = [
                SeriesPublic(
                    series_instance_uid=s.series_uid,
                    modality=s.modality,
                    body_part=s.body_part,
                    manufacturer=s.manufacturer,
                    model=s.model,
                    series_number=s.series_number,
                    instance_count=s.instance_count,
                    instances=by_series.get(s.id, []),
                )
                for s in series_rows
            ]
            history = [
                StatusChangePublic(
                    from_status=c.from_status,
                    to_status=c.to_status,
                    actor=c.actor,
                    reason=c.reason,
                    at=c.at,
                )
                for c in session.scalars(
                    select(StatusChange)
                    .where(StatusChange.study_id == study.id)
                    .order_by(StatusChange.id)
                )
            ]
            labels = [
                LabelPublic(scheme=lab.scheme, name=lab.name, value=lab.value)
                for lab in session.scalars(
                    select(Label)
                    .where(Label.study_id == study.id)
                    .order_by(Label.scheme, Label.name)
                )
            ]
            clinical = {
                c.variable: c.value
                for c in session.scalars(
                    select(ClinicalValue)
                    .where(ClinicalValue.study_id == study.id)
                    .order_by(ClinicalValue.variable)
                )
            }
            return StudyDetail(
                **self._summary(study, pseudonym),
                series=series,
                history=history,
                labels=labels,
                clinical=clinical,
            )

    def outbox(self, state: str | None = None, limit: int = 100) -> list[OutboxEntryPublic]:
        """The outbox, newest first."""
        with self.db.read() as session:
            query = (
                select(OutboxEntry, Study.study_uid)
                .join(Study, Study.id == OutboxEntry.study_id)
                .order_by(OutboxEntry.id.desc())
                .limit(limit)
            )
            if state:
                query = query.where(OutboxEntry.state == state)
            return [
                OutboxEntryPublic(
                    study_instance_uid=uid,
                    kind=e.kind,
                    state=e.state,
                    attempts=e.attempts,
                    next_attempt_at=e.next_attempt_at,
                    bytes_sent=e.bytes_sent,
                    bytes_total=e.bytes_total,
                    last_code=e.last_code,
                    last_error=e.last_error,
                    updated_at=e.updated_at,
                )
                for e, uid in session.execute(query).all()
            ]

    def counts(self) -> Counts:
        with self.db.read() as session:
            by_status = dict(
                session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
            )
            by_modality = dict(
                session.execute(
                    select(
                        func.coalesce(Series.modality, ""), func.sum(Series.instance_count)
                    ).group_by(Series.modality)
                ).all()
            )
            return Counts(
                studies=sum(by_status.values()),
                instances=session.scalar(select(func.count()).select_from(Instance)) or 0,
                by_status={str(k): int(v) for k, v in by_status.items()},
                by_modality={str(k): int(v) for k, v in by_modality.items()},
                quarantined=session.scalar(select(func.count()).select_from(QuarantineEntry)) or 0,
            )

    def quarantine(self, limit: int = 50, offset: int = 0) -> QuarantinePage:
        _check_page(limit, offset)
        with self.db.read() as session:
            total = session.scalar(select(func.count()).select_from(QuarantineEntry)) or 0
            entries = session.scalars(
                select(QuarantineEntry)
                .order_by(QuarantineEntry.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
            items = [QuarantinePublic.model_validate(e) for e in entries]
        return QuarantinePage(items=items, total=total, limit=limit, offset=offset)

    def instance_path(self, study_uid: str, sop_uid: str) -> str:
        """The stored file of one instance of a study (relative to the store)."""
        with self.db.read() as session:
            path = session.scalar(
                select(Instance.path)
                .join(Study, Study.id == Instance.study_id)
                .where(Instance.sop_uid == sop_uid, Study.study_uid == study_uid)
            )
        if path is None:
            raise NodeError("not_found", f"no instance {sop_uid} in study {study_uid}")
        return str(path)

    def recent_activity(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest audit entries, for the dashboard."""
        from node.index.models import AuditEntry

        with self.db.read() as session:
            rows = session.execute(
                select(AuditEntry.at, AuditEntry.actor, AuditEntry.action, AuditEntry.subject)
                .order_by(AuditEntry.seq.desc())
                .limit(limit)
            ).all()
        return [
            {"at": r.at, "actor": r.actor, "action": r.action, "subject": r.subject} for r in rows
        ]

    def instance_paths(self) -> list[str]:
        """Every stored path the index refers to (for consistency checks)."""
        with self.db.read() as session:
            return list(session.scalars(select(Instance.path)))

    # -- tokens ----------------------------------------------------------------------------

    def create_token(self, name: str, role: str, actor: str) -> str:
        """A new API token; only its hash is kept, so this is the one time it is shown."""
        if role not in ROLES:
            raise NodeError("bad_role", f'Argument "role" must be one of {", ".join(ROLES)}.')
        if not name or len(name) > 64:
            raise NodeError("bad_name", 'Argument "name" must be 1-64 characters.')
        token = "rfn_" + secrets.token_urlsafe(32)
        with self.db.write() as session:
            if session.scalar(select(ApiToken).where(ApiToken.name == name)) is not None:
                raise NodeError("token_exists", f'a token named "{name}" exists; revoke it first')
            session.add(ApiToken(name=name, role=role, token_hash=_token_hash(token)))
            audit.append(session, actor, "token.create", name, role=role)
        return token

    def revoke_token(self, name: str, actor: str) -> None:
        with self.db.write() as session:
            token = session.scalar(select(ApiToken).where(ApiToken.name == name))
            if token is None or token.revoked_at is not None:
                raise NodeError("token_not_found", f'no active token named "{name}"')
            token.revoked_at = utcnow()
            audit.append(session, actor, "token.revoke", name)

    def check_token(self, token: str) -> tuple[str, str] | None:
        """(name, role) of an active token, None otherwise."""
        with self.db.read() as session:
            found = session.scalar(
                select(ApiToken).where(
                    ApiToken.token_hash == _token_hash(token), ApiToken.revoked_at.is_(None)
                )
            )
            return None if found is None else (found.name, found.role)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _instance_public(inst: Instance) -> InstancePublic:
    return InstancePublic(
        sop_instance_uid=inst.sop_uid,
        sop_class_uid=inst.sop_class_uid,
        instance_number=inst.instance_number,
        rows=inst.rows,
        columns=inst.columns,
        pixel_spacing=inst.pixel_spacing,
        slice_thickness=inst.slice_thickness,
        number_of_frames=inst.number_of_frames,
        transfer_syntax=inst.transfer_syntax,
        photometric_interpretation=inst.photometric,
        size=inst.size,
        sha256=inst.sha256,
        burned_in_risk=inst.burned_in_risk,
        risk_reasons=json.loads(inst.risk_reasons),
        received_via=inst.received_via,
        received_at=inst.received_at,
    )


def _image(table: Any, filters: list[tuple[str, str, object]]) -> list[ColumnElement[bool]]:
    """Image-attribute filters over the columns of ``table`` (Series or Instance)."""
    out: list[ColumnElement[bool]] = []
    for name, op, value in filters:
        column = getattr(table, name)
        if op == "==":
            out.append(column == value)
        elif op == ">=":
            out.append(column >= value)
        elif op == "<=":
            out.append(column <= value)
        elif op == "is":
            out.append(column.is_(value))
        else:  # frames: a single-frame image has no Number of Frames and counts as one
            frames = column >= value
            out.append(or_(frames, column.is_(None)) if int(str(value)) <= 1 else frames)
    return out


def _conditions(q: StudyQuery) -> list[ColumnElement[bool]]:
    """A query's filters as conditions over studies."""
    conditions: list[ColumnElement[bool]] = []
    if q.status:
        conditions.append(Study.status.in_([s.value for s in q.status]))
    if q.study_date_from is not None:
        conditions.append(Study.study_date >= q.study_date_from)
    if q.study_date_to is not None:
        conditions.append(Study.study_date <= q.study_date_to)
    if q.pseudonym:
        conditions.append(
            Study.patient_id.in_(select(Patient.id).where(Patient.pseudonym == q.pseudonym))
        )
    series_conditions: list[ColumnElement[bool]] = [
        column == value
        for column, value in (
            (Series.modality, q.modality),
            (Series.body_part, q.body_part),
            (Series.manufacturer, q.manufacturer),
            (Series.model, q.model),
        )
        if value is not None
    ]
    # Image attributes are asked of the series summary where the series is uniform,
    # and of its instances only where it is not: a search reads series, not images.
    image_filters: list[tuple[str, str, object]] = []
    for name, op, value in (
        ("rows", "==", q.rows),
        ("columns", "==", q.columns),
        ("pixel_spacing", ">=", q.pixel_spacing_min),
        ("pixel_spacing", "<=", q.pixel_spacing_max),
        ("slice_thickness", ">=", q.slice_thickness_min),
        ("slice_thickness", "<=", q.slice_thickness_max),
        ("number_of_frames", ">=frames", q.number_of_frames_min),
        ("transfer_syntax", "==", q.transfer_syntax),
        ("photometric", "==", q.photometric),
        ("burned_in_risk", "is", q.burned_in_risk),
    ):
        if value is not None:
            image_filters.append((name, op, value))
    if image_filters:
        on_series = and_(Series.uniform.is_(True), *_image(Series, image_filters))
        on_instances = and_(
            Series.uniform.is_(False),
            exists(
                select(Instance.id).where(
                    Instance.series_id == Series.id, *_image(Instance, image_filters)
                )
            ),
        )
        series_conditions.append(or_(on_series, on_instances))
    if series_conditions:
        conditions.append(
            exists(select(Series.id).where(Series.study_id == Study.id, *series_conditions))
        )
    return conditions

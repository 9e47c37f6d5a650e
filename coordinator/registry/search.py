"""Search the registered exams, show one exam, count exams along a dimension.

Filters (``protocols`` ``ExamFilters``; every condition given must hold) become
conditions the registry's indexes answer: the site through
``ix_exams_site_modality``; the modality through it or through
``ix_exams_modality_study_date`` / ``ix_exams_modality_registered_at``, as an
``IN`` over the exams' modality strings that contain it (``CT`` finds ``CT`` and
``CT\\SR``: an exam matches if any of its modalities is the one asked for);
labels and clinical values as one ``IN`` over the intersection of their exam
ids, read from ``ix_labels_value_exam`` and ``ix_clinical_value_exam`` alone;
body part and dates on their indexes; the sort keys on ``ix_exams_study_date``
and ``ix_exams_registered_at``. Withdrawn exams are left out unless asked for,
as "not among the withdrawn ids" (``ix_exams_withdrawn_at``). A page's ids are
found first, from the indexes, and only the rows of that page are read.
``bench/coordinator_registry.py`` measures all of it on 1,000,000 instances.

Study dates are the de-identified ones, shifted per patient by the site, so a
date range is approximate across patients.

Statistics count non-withdrawn exams by site, by modality or by label; in a
researcher's view a count from 1 to k-1 reads ``<k`` (``small_count_k``),
operators see exact counts. ``contributions`` counts them by site and day of
registration (the coordinator UI's plot).
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import ValidationError
from sqlalchemy import ColumnElement, Select, func, intersect, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from coordinator.errors import CoordinatorError
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    Site,
)
from protocols.api.coordinator import (
    DeidRecord,
    ExamDetail,
    ExamFilters,
    ExamPage,
    ExamSort,
    ExamSummary,
    InstanceEntry,
    LabelEntry,
    SeriesEntry,
    SortOrder,
    StatsTable,
)

#: The largest page a search returns.
MAX_LIMIT = 500
#: The largest offset SQLite and PostgreSQL take (a 64-bit signed integer).
MAX_OFFSET = 2**63 - 1
#: What statistics count exams by.
DIMENSIONS = ("site", "modality", "label")
#: ``KEY=VALUE`` filter keys (the CLI's ``--filter``) -> ``ExamFilters`` fields.
FILTER_KEYS = {
    "site": "site",
    "modality": "modality",
    "body_part": "body_part",
    "label": "labels",
    "clinical": "clinical",
    "date_from": "study_date_from",
    "date_to": "study_date_to",
}
_LISTS = {"labels", "clinical"}


def _invalid(message: str) -> CoordinatorError:
    return CoordinatorError("invalid_filter", message)


def make_filters(**fields: Any) -> ExamFilters:
    """``ExamFilters`` from field values, or ``invalid_filter`` naming the bad argument."""
    try:
        return ExamFilters(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f'Argument "{".".join(str(p) for p in e["loc"]) or "filters"}": '
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise _invalid(problems) from None


def parse_filters(items: Iterable[str]) -> ExamFilters:
    """Filters from ``KEY=VALUE`` texts (keys: ``FILTER_KEYS``; label and clinical repeat)."""
    fields: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in FILTER_KEYS:
            raise _invalid(
                f'Argument "filter" must be KEY=VALUE with KEY one of '
                f"{', '.join(FILTER_KEYS)}; not {item!r}."
            )
        field = FILTER_KEYS[key]
        if field in _LISTS:
            fields.setdefault(field, []).append(value)
        elif field in fields:
            raise _invalid(f'Argument "filter": {key} is given twice.')
        else:
            fields[field] = value
    return make_filters(**fields)


def parse_label(condition: str) -> tuple[str, str, str]:
    """``scheme:name=value`` -> (scheme, name, value)."""
    key, sep, value = condition.partition("=")
    scheme, colon, name = key.partition(":")
    if not sep or not colon or not scheme or not name:
        raise _invalid(f'Argument "label" must be "scheme:name=value", not {condition!r}.')
    return scheme, name, value


def parse_clinical(condition: str) -> tuple[str, str]:
    """``variable=value`` -> (variable, value)."""
    variable, sep, value = condition.partition("=")
    if not sep or not variable:
        raise _invalid(f'Argument "clinical" must be "variable=value", not {condition!r}.')
    return variable, value


def modality_strings(session: Session, modality: str) -> list[str]:
    """The exams' modality strings (``CT\\SR``) that contain ``modality``.

    There are few distinct ones, and an ``IN`` over them keeps the modality a
    plain indexed comparison where a pattern match could not use an index.
    """
    strings = session.scalars(select(Exam.modality).distinct())
    return sorted(s for s in strings if modality in s.split("\\"))


#: The exams table under another name, made once: an alias of a mapped class proxies
#: every column, a quarter of a search's CPU when it was made for each search
#: (statements are immutable, so one serves every query; bench/load_coordinator.py).
_GONE = aliased(Exam)
_WITHDRAWN_IDS: Select[int] = select(_GONE.id).where(_GONE.withdrawn_at.is_not(None))


def withdrawn_ids() -> Select[int]:
    """Ids of the withdrawn exams (few; ``ix_exams_withdrawn_at`` finds them)."""
    return _WITHDRAWN_IDS


def available(exam_id: InstrumentedAttribute[int]) -> ColumnElement[bool]:
    """``exam_id`` is not withdrawn.

    Asked as "not among the few withdrawn ids" rather than of each exam's
    ``withdrawn_at``: on SQLite that column is stored after the exam's manifest,
    and reading it means walking the manifest's overflow pages, row after row.
    """
    return exam_id.not_in(withdrawn_ids())


def conditions(
    session: Session, filters: ExamFilters, *, include_withdrawn: bool = False
) -> list[ColumnElement[bool]]:
    """The SQL conditions on ``Exam`` that ``filters`` stand for."""
    where: list[ColumnElement[bool]] = []
    if not include_withdrawn:
        where.append(available(Exam.id))
    if filters.site is not None:
        site_id = select(Site.id).where(Site.name == filters.site).scalar_subquery()
        where.append(Exam.site_id == site_id)
    if filters.modality is not None:
        where.append(Exam.modality.in_(modality_strings(session, filters.modality)))
    if filters.body_part is not None:
        where.append(Exam.body_part == filters.body_part)
    having: list[Select[int]] = []
    for label in filters.labels:
        scheme, name, value = parse_label(label)
        having.append(
            select(ExamLabel.exam_id).where(
                ExamLabel.scheme == scheme, ExamLabel.name == name, ExamLabel.value == value
            )
        )
    for clinical in filters.clinical:
        variable, value = parse_clinical(clinical)
        having.append(
            select(ExamClinical.exam_id).where(
                ExamClinical.variable == variable, ExamClinical.value == value
            )
        )
    if len(having) == 1:
        where.append(Exam.id.in_(having[0]))
    elif having:
        # One intersection of index-only scans: SQLite would otherwise pick one of
        # several IN lists to drive the search by, without knowing which is smallest.
        where.append(Exam.id.in_(intersect(*having)))
    if filters.study_date_from is not None:
        where.append(Exam.study_date >= filters.study_date_from)
    if filters.study_date_to is not None:
        where.append(Exam.study_date <= filters.study_date_to)
    return where


def matching_ids(session: Session, filters: ExamFilters) -> list[int]:
    """Ids of the non-withdrawn exams matching ``filters``, by study UID (what releases take)."""
    query = select(Exam.id).where(*conditions(session, filters)).order_by(Exam.study_uid)
    return list(session.scalars(query))


_SUMMARY_COLUMNS = (
    Exam.study_uid,
    Site.name,
    Exam.patient_pseudonym,
    Exam.study_date,
    Exam.modality,
    Exam.body_part,
    Exam.series_count,
    Exam.instance_count,
    Exam.size,
    Exam.registered_at,
    Exam.withdrawn_at,
)


def _summary(row: Sequence[Any]) -> ExamSummary:
    uid, site, pseudonym, date, modality, body_part, series, instances, size, at, gone = row
    return ExamSummary(
        study_instance_uid=uid,
        site=site,
        pseudonym=pseudonym,
        study_date=date,
        modalities=modality.split("\\"),
        body_part=body_part,
        series_count=series,
        instance_count=instances,
        size=size,
        registered_at=at,
        withdrawn_at=gone,
    )


def _order(column: Any, exam_id: Any, order: SortOrder) -> tuple[Any, Any]:
    """Sort keys; an undated exam counts as older than any date (first up, last down).

    That is SQLite's own NULL order, so its indexes serve the sort; PostgreSQL
    is told explicitly.
    """
    if order == SortOrder.ASC:
        return column.asc().nulls_first(), exam_id.asc()
    return column.desc().nulls_last(), exam_id.desc()


def search(
    db: Database,
    filters: ExamFilters,
    *,
    include_withdrawn: bool = False,
    sort: ExamSort = ExamSort.STUDY_DATE,
    order: SortOrder = SortOrder.DESC,
    limit: int = 50,
    offset: int = 0,
) -> ExamPage:
    """One page of the exams matching ``filters``, with how many match in all.

    Parameters
    ----------
    include_withdrawn
        Also list exams their sites withdrew (``withdrawn_at`` says when).
    sort, order
        By shifted study date or by registration time; an undated exam counts as
        older than any date.
    limit, offset
        At most ``MAX_LIMIT`` exams per page.
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise CoordinatorError(
            "invalid_argument", f'Argument "limit" must be from 1 to {MAX_LIMIT}, not {limit}.'
        )
    if not 0 <= offset <= MAX_OFFSET:
        raise CoordinatorError(
            "invalid_argument", f'Argument "offset" must be from 0 to {MAX_OFFSET}.'
        )
    sort, order = ExamSort(sort), SortOrder(order)
    column = Exam.study_date if sort == ExamSort.STUDY_DATE else Exam.registered_at
    with db.read() as session:
        where = conditions(session, filters, include_withdrawn=include_withdrawn)
        total = session.scalar(select(func.count()).select_from(Exam).where(*where)) or 0
        # The page's ids first, from the indexes alone; then only their rows are read.
        page = (
            select(Exam.id, column.label("key"))
            .where(*where)
            .order_by(*_order(column, Exam.id, order))
            .limit(limit)
            .offset(offset)
            .subquery()
        )
        rows = session.execute(
            select(*_SUMMARY_COLUMNS)
            .join(page, page.c.id == Exam.id)
            .join(Site, Site.id == Exam.site_id)
            .order_by(*_order(page.c.key, page.c.id, order))
        )
        items = [_summary(row) for row in rows]
    return ExamPage(items=items, total=total, limit=limit, offset=offset)


def detail(db: Database, study_uid: str) -> ExamDetail:
    """One exam with its series and instances, labels, clinical values and de-identification.

    Read as plain rows, not ORM objects: an exam page is asked for often and an
    exam has hundreds of instances.
    """
    with db.read() as session:
        exam = session.execute(
            select(Exam.id, Exam.manifest, Exam.manifest_sha256, *_SUMMARY_COLUMNS)
            .join(Site, Site.id == Exam.site_id)
            .where(Exam.study_uid == study_uid)
        ).first()
        if exam is None:
            raise CoordinatorError("exam_not_found", f"the registry holds no exam {study_uid}")
        exam_id, manifest, manifest_sha256 = exam[:3]
        series_rows = session.execute(
            select(
                ExamSeries.id,
                ExamSeries.series_uid,
                ExamSeries.modality,
                ExamSeries.body_part,
                ExamSeries.series_number,
            )
            .where(ExamSeries.exam_id == exam_id)
            .order_by(ExamSeries.id)
        ).all()
        instances: dict[int, list[InstanceEntry]] = defaultdict(list)
        for series_id, sop_uid, sop_class_uid, size, sha256 in session.execute(
            select(
                ExamInstance.series_id,
                ExamInstance.sop_uid,
                ExamInstance.sop_class_uid,
                ExamInstance.size,
                ExamInstance.sha256,
            )
            .where(ExamInstance.exam_id == exam_id)
            .order_by(ExamInstance.id)
        ):
            instances[series_id].append(
                InstanceEntry(
                    sop_instance_uid=sop_uid, sop_class_uid=sop_class_uid, size=size, sha256=sha256
                )
            )
        labels = session.execute(
            select(ExamLabel.scheme, ExamLabel.name, ExamLabel.value)
            .where(ExamLabel.exam_id == exam_id)
            .order_by(ExamLabel.scheme, ExamLabel.name)
        ).all()
        clinical = session.execute(
            select(ExamClinical.variable, ExamClinical.value)
            .where(ExamClinical.exam_id == exam_id)
            .order_by(ExamClinical.variable)
        ).all()
    summary = _summary(exam[3:])
    return ExamDetail(
        **summary.model_dump(),
        series=[
            SeriesEntry(
                series_instance_uid=series_uid,
                modality=modality,
                body_part=body_part,
                series_number=number,
                instances=instances[series_id],
            )
            for series_id, series_uid, modality, body_part, number in series_rows
        ],
        labels=[LabelEntry(scheme=s, name=n, value=v) for s, n, v in labels],
        clinical=dict(clinical),
        deid=DeidRecord.model_validate(json.loads(manifest)["deid"]),
        manifest_sha256=manifest_sha256,
    )


def _label_counts(session: Session, label: str | None) -> dict[str, int]:
    query = (
        select(ExamLabel.scheme, ExamLabel.name, ExamLabel.value, func.count())
        .where(available(ExamLabel.exam_id))
        .group_by(ExamLabel.scheme, ExamLabel.name, ExamLabel.value)
    )
    if label is None:
        return {f"{s}:{n}={v}": c for s, n, v, c in session.execute(query)}
    scheme, colon, name = label.partition(":")
    if not colon or not scheme or not name:
        raise _invalid(f'Argument "label" must be "scheme:name", not {label!r}.')
    query = query.where(ExamLabel.scheme == scheme, ExamLabel.name == name)
    return {v: c for _, _, v, c in session.execute(query)}


def stats(
    db: Database, dimension: str, *, k: int, exact: bool = False, label: str | None = None
) -> StatsTable:
    """Counts of non-withdrawn exams by ``dimension`` (``DIMENSIONS``).

    Parameters
    ----------
    k
        Counts from 1 to ``k - 1`` read ``<k`` unless ``exact`` (operators).
    label
        With ``dimension="label"``: one label ``scheme:name``, counted by value
        (dimension ``label:scheme:name``); without it every ``scheme:name=value``.
    """
    if dimension not in DIMENSIONS:
        raise CoordinatorError(
            "unknown_dimension",
            f'Argument "dimension" must be one of {", ".join(DIMENSIONS)}, not {dimension!r}.',
        )
    if label is not None and dimension != "label":
        raise _invalid('Argument "label" goes with the dimension "label" only.')
    not_withdrawn = available(Exam.id)
    with db.read() as session:
        if dimension == "site":
            rows = session.execute(
                select(Site.name, func.count())
                .select_from(Exam)
                .join(Site, Site.id == Exam.site_id)
                .where(not_withdrawn)
                .group_by(Site.name)
            )
            counts = {site: count for site, count in rows}
        elif dimension == "modality":
            counts = defaultdict(int)
            combinations = session.execute(
                select(Exam.modality, func.count()).where(not_withdrawn).group_by(Exam.modality)
            )
            for modalities, count in combinations:
                for modality in set(modalities.split("\\")):
                    counts[modality] += count
        else:
            counts = _label_counts(session, label)
    name = f"label:{label}" if label is not None else dimension
    return StatsTable.of(name, counts, k, suppress=not exact)


def contributions(db: Database, *, by_site: bool = True) -> list[tuple[dt.date, str, int]]:
    """Non-withdrawn exams registered per UTC day (and site), oldest day first.

    Without ``by_site`` every row's site is ``""``: the federation's total per day.
    """
    day = func.date(Exam.registered_at)
    keys = [day, Site.name] if by_site else [day]
    query = select(*keys, func.count()).select_from(Exam).where(available(Exam.id))
    if by_site:
        query = query.join(Site, Site.id == Exam.site_id)
    with db.read() as session:
        rows = session.execute(query.group_by(*keys).order_by(*keys)).all()
    # SQLite answers date() with text, PostgreSQL with a date: both read the same.
    return [
        (dt.date.fromisoformat(str(row[0])[:10]), str(row[1]) if by_site else "", int(row[-1]))
        for row in rows
    ]


def instance_object(db: Database, study_uid: str, sop_uid: str) -> str:
    """The sha256 (object store name) of one instance of a registered exam."""
    with db.read() as session:
        sha = session.scalar(
            select(ExamInstance.sha256)
            .join(Exam, Exam.id == ExamInstance.exam_id)
            .where(Exam.study_uid == study_uid, ExamInstance.sop_uid == sop_uid)
        )
    if sha is None:
        raise CoordinatorError(
            "instance_not_found", f"the registry holds no instance {sop_uid} in exam {study_uid}"
        )
    return str(sha)

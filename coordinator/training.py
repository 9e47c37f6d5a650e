"""Federated training runs: submitted by researchers, run by Flower, recorded in the registry.

``submit`` checks the request (the app exists, the release exists, enough sites are
enrolled), gives the run its id and directory and starts it on the SuperLink with
``flwr run`` and a run config (``protocols.training`` names what the ServerApp
writes there). ``RunWatcher.poll`` (in ``serve``) reads each running run's
directory into the registry — rounds with the sites that trained (and on how many
samples), declined or dropped; metrics; the final model with its provenance — and
notices runs Flower ended without the ServerApp saying so, and runs that were in
flight when the SuperLink restarted: those fail with a message saying how to
resume. ``resume`` starts a new Flower run from the last checkpoint, continuing
the round count; ``stop`` stops the Flower run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from coordinator import audit
from coordinator.errors import CoordinatorError
from coordinator.flower import FlowerCli
from coordinator.objects import ObjectStore
from coordinator.registry.db import Database
from coordinator.registry.models import (
    Exam,
    Model,
    NodeCertificate,
    Release,
    ReleaseExam,
    Site,
    TrainingRound,
    TrainingRun,
)
from coordinator.settings import CoordinatorSettings
from protocols.api.training import (
    AppPublic,
    ModelPublic,
    Provenance,
    RunCreate,
    RunPublic,
    RunRound,
    RunStatus,
)
from protocols.sqltypes import utcnow
from protocols.storage import private_dir
from protocols.training import (
    RUN_CHECKPOINTS_DIR,
    RUN_MODEL_FILE,
    RUN_ROUNDS_FILE,
    RUN_STATUS_FILE,
    RoundRecord,
    RunPhase,
    RunState,
)

log = logging.getLogger("radfed.coordinator.training")


# -- apps ----------------------------------------------------------------------------------------


def _app_dir(settings: CoordinatorSettings, name: str) -> Path:
    path = (settings.apps_dir / name).resolve()
    if path.parent != settings.apps_dir.resolve() or not (path / "pyproject.toml").is_file():
        raise CoordinatorError("app_not_found", f"no Flower app named {name} on this coordinator")
    return path


@lru_cache(maxsize=64)
def _fab_hash(path: Path, stamp: tuple[tuple[str, int, int], ...]) -> str:
    from flwr.cli.build import build_fab_from_disk

    del stamp  # part of the cache key only
    return hashlib.sha256(build_fab_from_disk(path)).hexdigest()


def fab_hash(app_dir: Path) -> str:
    """SHA-256 of the bundle (FAB) Flower builds from ``app_dir`` and sends the nodes."""
    stamp = tuple(
        sorted(
            (str(p.relative_to(app_dir)), p.stat().st_mtime_ns, p.stat().st_size)
            for p in app_dir.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        )
    )
    return _fab_hash(app_dir, stamp)


def list_apps(settings: CoordinatorSettings) -> list[AppPublic]:
    apps: list[AppPublic] = []
    if not settings.apps_dir.is_dir():
        return apps
    for path in sorted(settings.apps_dir.iterdir()):
        if not (path / "pyproject.toml").is_file():
            continue
        project = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))
        apps.append(
            AppPublic(
                name=path.name,
                version=str(project.get("project", {}).get("version", "")),
                hash=fab_hash(path),
            )
        )
    return apps


# -- submitting ------------------------------------------------------------------------------


def run_config(
    settings: CoordinatorSettings, name: str, body: RunCreate, run_dir: Path
) -> dict[str, Any]:
    """The Flower run config of a request (keys of the app's ``[tool.flwr.app.config]``)."""
    config: dict[str, Any] = {
        "radfed-run": name,
        "run-dir": str(run_dir),
        "num-rounds": body.rounds,
        "min-nodes": body.min_nodes,
        "strategy": body.strategy,
        "proximal-mu": float(body.proximal_mu),
        "secagg": body.secagg,
        "dp-clip": float(body.dp_clip or 0.0),
        "dp-noise": float(body.dp_noise),
        "local-epochs": body.local_epochs,
        "batch-size": body.batch_size,
        "learning-rate": float(body.learning_rate),
        "image-size": body.image_size,
        "task": body.task,
        "round-timeout": float(body.round_timeout),
        "cohort-release": body.release or "",
        "cohort-filter": ";".join(body.filter),
        "seed": body.seed,
    }
    if settings.central_eval_manifest is not None:
        config["central-eval"] = str(settings.central_eval_manifest.resolve())
    return config


def _active_sites(session: Session) -> int:
    return int(
        session.scalar(
            select(func.count(func.distinct(Site.id)))
            .join(NodeCertificate, NodeCertificate.site_id == Site.id)
            .where(Site.revoked_at.is_(None), NodeCertificate.revoked_at.is_(None))
        )
        or 0
    )


def submit(
    db: Database,
    settings: CoordinatorSettings,
    cli: FlowerCli,
    body: RunCreate,
    who: str,
    superlink_restarts: int = 0,
) -> RunPublic:
    """Start a run; its public view (status ``failed`` with the reason if Flower refused)."""
    app_dir = _app_dir(settings, body.app)
    app_hash = fab_hash(app_dir)
    with db.write() as session:
        if body.release is not None and (
            session.scalar(select(Release.id).where(Release.name == body.release)) is None
        ):
            raise CoordinatorError("release_not_found", f"no release named {body.release}")
        sites = _active_sites(session)
        if sites < body.min_nodes:
            raise CoordinatorError(
                "not_enough_sites",
                f"min_nodes is {body.min_nodes} but {sites} site(s) are enrolled",
            )
        run = TrainingRun(
            name="run-pending",
            app=body.app,
            status=RunStatus.RUNNING.value,
            config=body.model_dump_json(),
            created_by=who,
            app_hash=app_hash,
            rounds=body.rounds,
            metrics=json.dumps({"superlink_restarts": superlink_restarts}),
        )
        session.add(run)
        session.flush()
        run.name = f"run-{run.id:04d}"
        run.run_dir = str((settings.runs_dir / run.name).resolve())
        audit.append(
            session,
            who,
            "run.submit",
            run.name,
            app=body.app,
            app_hash=app_hash,
            request=body.model_dump(mode="json"),
        )
        name, run_dir = run.name, Path(run.run_dir)
    private_dir(run_dir)
    _start(db, cli, name, app_dir, run_config(settings, name, body, run_dir), who)
    return get(db, name)


def _start(
    db: Database, cli: FlowerCli, name: str, app_dir: Path, config: dict[str, Any], who: str
) -> None:
    try:
        flower_id = cli.start_run(app_dir, config)
    except CoordinatorError as exc:
        with db.write() as session:
            run = _run(session, name)
            run.status = RunStatus.FAILED.value
            run.error = f"Flower did not start the run: {exc.message}"
            run.finished_at = utcnow()
            audit.append(session, who, "run.failed", name, error=run.error)
        return
    with db.write() as session:
        run = _run(session, name)
        run.flower_run_id = flower_id
        run.attempts = json.dumps([*json.loads(run.attempts or "[]"), flower_id])
        audit.append(session, who, "run.start", name, flower_run=flower_id)


def _run(session: Session, name: str) -> TrainingRun:
    run = session.scalar(select(TrainingRun).where(TrainingRun.name == name))
    if run is None:
        raise CoordinatorError("run_not_found", f"no training run {name}")
    return run


def stop(db: Database, cli: FlowerCli, name: str, who: str) -> RunPublic:
    with db.read() as session:
        run = _run(session, name)
        status, flower_id = run.status, run.flower_run_id
    if status != RunStatus.RUNNING.value:
        raise CoordinatorError("run_not_running", f"run {name} is {status}")
    if flower_id is not None:
        try:
            cli.stop_run(flower_id)
        except CoordinatorError as exc:  # it may have just ended; we stop it on our side anyway
            log.warning("flwr stop %s: %s", flower_id, exc.message)
    with db.write() as session:
        run = _run(session, name)
        run.status = RunStatus.STOPPED.value
        run.finished_at = utcnow()
        audit.append(session, who, "run.stop", name)
    return get(db, name)


def last_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """The latest round checkpointed in ``run_dir`` and its file."""
    best: tuple[int, Path] | None = None
    folder = run_dir / RUN_CHECKPOINTS_DIR
    for path in folder.glob("round-*.safetensors") if folder.is_dir() else []:
        try:
            number = int(path.stem.split("-", 1)[1])
        except ValueError:
            continue
        if best is None or number > best[0]:
            best = (number, path)
    return best


def resume(
    db: Database,
    settings: CoordinatorSettings,
    cli: FlowerCli,
    name: str,
    who: str,
    superlink_restarts: int = 0,
) -> RunPublic:
    """Continue a failed or stopped run from its last checkpoint."""
    with db.write() as session:
        run = _run(session, name)
        if run.status not in (RunStatus.FAILED.value, RunStatus.STOPPED.value):
            raise CoordinatorError("run_not_resumable", f"run {name} is {run.status}")
        body = RunCreate.model_validate_json(run.config)
        run_dir = Path(run.run_dir)
        checkpoint = last_checkpoint(run_dir)
        if checkpoint is not None and checkpoint[0] >= body.rounds:
            raise CoordinatorError("run_not_resumable", f"run {name} has all its rounds")
        run.status = RunStatus.RUNNING.value
        run.error = None
        run.finished_at = None
        run.metrics = json.dumps({"superlink_restarts": superlink_restarts})
        # Until the new Flower run exists, nothing of the old attempt may decide this one:
        # not its Flower status, not the status file its ServerApp left.
        run.flower_run_id = None
        (run_dir / RUN_STATUS_FILE).unlink(missing_ok=True)
        audit.append(
            session, who, "run.resume", name, from_round=checkpoint[0] if checkpoint else 0
        )
    config = run_config(settings, name, body, run_dir)
    if checkpoint is not None:
        config["resume-from"] = str(checkpoint[1])
    _start(db, cli, name, _app_dir(settings, body.app), config, who)
    return get(db, name)


# -- reading the run directories ---------------------------------------------------------------


def _node_sites(session: Session) -> dict[str, str]:
    """Flower node id -> site name (every id a site has been registered under)."""
    return {
        s.flower_node_id: s.name
        for s in session.scalars(select(Site).where(Site.flower_node_id.is_not(None)))
        if s.flower_node_id is not None
    }


def _names(ids: list[str], sites: dict[str, str]) -> list[str]:
    return sorted(sites.get(i, f"node:{i}") for i in ids)


def _counts(ids: dict[str, int], sites: dict[str, str]) -> dict[str, int]:
    return {sites.get(i, f"node:{i}"): n for i, n in sorted(ids.items())}


def _read_rounds(run_dir: Path) -> list[RoundRecord]:
    path = run_dir / RUN_ROUNDS_FILE
    records: dict[int, RoundRecord] = {}
    if not path.exists():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = RoundRecord.model_validate_json(line)
        except ValidationError:
            continue  # a line being written; read next time
        records[record.round] = record  # a resumed run may repeat a round: the last one counts
    return [records[r] for r in sorted(records)]


def _read_state(run_dir: Path) -> RunState | None:
    try:
        return RunState.model_validate_json((run_dir / RUN_STATUS_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


@dataclass
class RunWatcher:
    """Keeps the registry's view of running runs up to date (``serve`` polls it)."""

    db: Database
    settings: CoordinatorSettings
    store: ObjectStore
    cli: FlowerCli
    superlink_restarts: Callable[[], int] = lambda: 0
    #: Seconds between asking Flower for a running run's status: each ask is a ``flwr``
    #: process (~2 s of CPU), and the run directory says almost everything sooner.
    flower_check_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _flower_checked: dict[str, float] = field(default_factory=dict)

    def poll(self) -> None:
        with self.db.read() as session:
            running = [
                (r.name, Path(r.run_dir), r.flower_run_id, json.loads(r.metrics or "{}"))
                for r in session.scalars(
                    select(TrainingRun).where(TrainingRun.status == RunStatus.RUNNING.value)
                )
            ]
        for name, run_dir, flower_id, meta in running:
            try:
                self._poll_run(name, run_dir, flower_id, meta)
            except Exception:
                log.exception("reading run %s failed", name)

    def _poll_run(
        self, name: str, run_dir: Path, flower_id: str | None, meta: dict[str, Any]
    ) -> None:
        # The status file first: the ServerApp writes a round's line before the status
        # that follows it, so a finished status read first means every round is on disk.
        state = _read_state(run_dir)
        self._record_rounds(name, _read_rounds(run_dir))
        if state is not None and state.phase == RunPhase.FINISHED:
            self._finish(name, run_dir)
            return
        if self.superlink_restarts() > int(meta.get("superlink_restarts", 0)):
            # Whatever the ServerApp said as it went down (it is told to stop), the cause
            # is the SuperLink's restart: the run's Flower state is gone.
            if flower_id is not None:
                with contextlib.suppress(CoordinatorError):
                    self.cli.stop_run(flower_id)
            detail = f" (the ServerApp said: {state.error})" if state and state.error else ""
            self._fail(
                name, f"the Flower SuperLink restarted while the run was in flight{detail}", True
            )
            return
        if state is not None and state.phase == RunPhase.FAILED:
            self._fail(name, state.error or "the ServerApp failed", resumable=True)
            return
        if flower_id is not None and self._flower_due(name):
            try:
                flower_status = self.cli.run_status(flower_id)
            except CoordinatorError:
                return  # the SuperLink is away; the restart check above decides
            if flower_status and flower_status.startswith("finished"):
                state = _read_state(run_dir)  # it may have finished in between
                if state is not None and state.phase == RunPhase.FINISHED:
                    self._record_rounds(name, _read_rounds(run_dir))
                    self._finish(name, run_dir)
                else:
                    self._fail(name, f"Flower ended the run ({flower_status})", True)

    def _flower_due(self, name: str) -> bool:
        """Whether to ask Flower about this run now: ``flower_check_s`` after the last ask
        (the first, that long after the watcher first saw the run)."""
        now = self.clock()
        last = self._flower_checked.setdefault(name, now)
        if now - last < self.flower_check_s:
            return False
        self._flower_checked[name] = now
        return True

    def _record_rounds(self, name: str, records: list[RoundRecord]) -> None:
        if not records:
            return
        with self.db.write() as session:
            run = _run(session, name)
            sites = _node_sites(session)
            have = {
                r.round: r
                for r in session.scalars(
                    select(TrainingRound).where(TrainingRound.run_id == run.id)
                )
            }
            for record in records:
                participation = json.dumps(
                    {
                        "trained": _counts(record.trained, sites),
                        "declined": _names(record.declined, sites),
                        "dropped": _names(record.dropped, sites),
                        "evaluated": _counts(record.evaluated, sites),
                    },
                    sort_keys=True,
                )
                metrics = json.dumps(
                    {
                        "train": record.train_metrics,
                        "evaluate": record.evaluate_metrics,
                        "central": record.central_metrics,
                    },
                    sort_keys=True,
                )
                row = have.get(record.round)
                if row is None:
                    session.add(
                        TrainingRound(
                            run_id=run.id,
                            round=record.round,
                            participation=participation,
                            metrics=metrics,
                            finished_at=record.finished_at,
                        )
                    )
                elif row.participation != participation or row.metrics != metrics:
                    row.participation, row.metrics = participation, metrics
                    row.finished_at = record.finished_at
                if record.dropped and not run.degraded:
                    run.degraded = True
                    audit.append(
                        session,
                        "coordinator",
                        "run.degraded",
                        name,
                        round=record.round,
                        dropped=_names(record.dropped, sites),
                    )
            run.current_round = max(run.current_round, records[-1].round)

    def _finish(self, name: str, run_dir: Path) -> None:
        model_path = run_dir / RUN_MODEL_FILE
        if not model_path.is_file():
            self._fail(name, "the ServerApp finished without writing a model", False)
            return
        digest = hashlib.sha256()
        with open(model_path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        sha = digest.hexdigest()
        self.store.put_file(model_path, sha)
        with self.db.write() as session:
            run = _run(session, name)
            if run.status != RunStatus.RUNNING.value:
                return
            run.status = RunStatus.FINISHED.value
            run.finished_at = utcnow()
            model = Model(
                run_id=run.id,
                name=f"{name}-model",
                sha256=sha,
                size=model_path.stat().st_size,
            )
            session.add(model)
            session.flush()
            view = _public(session, run)
            provenance = _provenance(session, run, view, sha, self.settings.federation)
            model.provenance = provenance.model_dump_json()
            model.metrics = json.dumps(provenance.metrics_history, sort_keys=True)
            audit.append(
                session,
                "coordinator",
                "run.finished",
                name,
                model_sha256=sha,
                sites=provenance.sites,
            )
        log.info("run %s finished; model %s registered", name, sha[:12])

    def _fail(self, name: str, error: str, resumable: bool) -> None:
        with self.db.write() as session:
            run = _run(session, name)
            if run.status != RunStatus.RUNNING.value:
                return
            checkpoint = last_checkpoint(Path(run.run_dir))
            hint = ""
            if resumable and checkpoint is not None:
                hint = (
                    f"; round {checkpoint[0]} is checkpointed: "
                    f"`radfed train resume {name}` continues from there"
                )
            elif resumable:
                hint = f"; `radfed train resume {name}` starts it again"
            run.status = RunStatus.FAILED.value
            run.error = error + hint
            run.finished_at = utcnow()
            audit.append(session, "coordinator", "run.failed", name, error=run.error)
        log.warning("run %s failed: %s", name, error)


# -- views --------------------------------------------------------------------------------------


def _history(session: Session, run: TrainingRun) -> list[RunRound]:
    rows = session.scalars(
        select(TrainingRound).where(TrainingRound.run_id == run.id).order_by(TrainingRound.round)
    )
    history = []
    for row in rows:
        who = json.loads(row.participation)
        metrics = json.loads(row.metrics)
        history.append(
            RunRound(
                round=row.round,
                trained=who.get("trained", {}),
                declined=who.get("declined", []),
                dropped=who.get("dropped", []),
                evaluated=who.get("evaluated", {}),
                train_metrics=metrics.get("train", {}),
                evaluate_metrics=metrics.get("evaluate", {}),
                central_metrics=metrics.get("central", {}),
                finished_at=row.finished_at,
            )
        )
    return history


def _participation(history: list[RunRound]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for record in history:
        for site in record.trained:
            seen[site] = "trained"
        for site in record.declined:
            seen[site] = "declined"
        for site in record.dropped:
            seen[site] = "dropped"
    return dict(sorted(seen.items()))


def _public(session: Session, run: TrainingRun) -> RunPublic:
    history = _history(session, run)
    model = session.scalar(select(Model).where(Model.run_id == run.id).order_by(Model.id.desc()))
    return RunPublic(
        id=run.name,
        app=run.app,
        app_hash=run.app_hash,
        status=RunStatus(run.status),
        degraded=run.degraded,
        rounds=run.rounds,
        current_round=run.current_round,
        request=RunCreate.model_validate_json(run.config),
        created_by=run.created_by,
        started_at=run.started_at,
        finished_at=run.finished_at,
        error=run.error,
        attempts=json.loads(run.attempts or "[]"),
        participation=_participation(history),
        history=history,
        model=(
            ModelPublic(
                name=model.name, sha256=model.sha256, size=model.size, created_at=model.created_at
            )
            if model is not None
            else None
        ),
    )


def _provenance(
    session: Session, run: TrainingRun, view: RunPublic, sha: str, federation: str
) -> Provenance:
    request = view.request
    history: dict[str, list[float]] = {}
    for record in view.history:
        named = [
            *record.train_metrics.items(),
            *record.evaluate_metrics.items(),
            # Centralised evaluation reports the same keys as federated evaluation.
            *(
                ("central-" + k.removeprefix("eval-").removeprefix("central-"), v)
                for k, v in record.central_metrics.items()
            ),
        ]
        for key, value in named:
            if not key.endswith("num-examples"):
                history.setdefault(key, []).append(value)
    cohort: dict[str, str | list[str] | None] = {
        "release": request.release,
        "filter": list(request.filter),
    }
    if request.release is not None:
        release = session.scalar(select(Release).where(Release.name == request.release))
        cohort["release_manifest_sha256"] = release.manifest_sha256 if release else None
    return Provenance(
        run=run.name,
        app=run.app,
        app_hash=run.app_hash,
        model_sha256=sha,
        strategy=request.strategy,
        privacy={
            "secagg": request.secagg,
            "dp_clip": request.dp_clip,
            "dp_noise": request.dp_noise,
            "proximal_mu": request.proximal_mu if request.strategy == "fedprox" else None,
        },
        cohort=cohort,
        sites=sorted({s for r in view.history for s in r.trained}),
        rounds=view.history,
        metrics_history=history,
        attempts=view.attempts,
        created_by=run.created_by,
        started_at=run.started_at,
        finished_at=run.finished_at,
        federation=federation,
    )


def get(db: Database, name: str) -> RunPublic:
    with db.read() as session:
        return _public(session, _run(session, name))


def list_runs(db: Database, limit: int = 100) -> list[RunPublic]:
    with db.read() as session:
        runs = session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit))
        return [_public(session, r) for r in runs]


def count_runs(db: Database) -> int:
    """How many runs were ever submitted."""
    with db.read() as session:
        return int(session.scalar(select(func.count()).select_from(TrainingRun)) or 0)


def model(db: Database, name: str) -> tuple[str, int, Provenance]:
    """The finished run's model (sha256, size) and its provenance."""
    with db.read() as session:
        run = _run(session, name)
        row = session.scalar(select(Model).where(Model.run_id == run.id).order_by(Model.id.desc()))
        if row is None:
            raise CoordinatorError(
                "model_not_found", f"run {name} has no model (it is {run.status})"
            )
        return row.sha256, row.size, Provenance.model_validate_json(row.provenance)


def release_studies(db: Database, release: str, site_id: int) -> list[str]:
    """The study UIDs of a site's exams in a release (what its node may train on)."""
    with db.read() as session:
        found = session.scalar(select(Release).where(Release.name == release))
        if found is None:
            raise CoordinatorError("release_not_found", f"no release named {release}")
        return list(
            session.scalars(
                select(Exam.study_uid)
                .join(ReleaseExam, ReleaseExam.exam_id == Exam.id)
                .where(ReleaseExam.release_id == found.id, Exam.site_id == site_id)
                .order_by(Exam.study_uid)
            )
        )

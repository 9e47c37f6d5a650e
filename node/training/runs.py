"""Each training run's decision on this node, kept in the node index and audited.

``admit`` is asked for every message a run sends (by the gate, before any app
code is loaded): the app bundle must be on the policy's list; a run waits in
``pending`` when the policy wants manual approval; an accepted run gets its
sample manifest built once per Flower run. Operators ``approve`` or ``decline``
runs (also before they arrive). Every decision, each manifest built and each
round trained go into the node's audit log with the run id and app hash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.errors import NodeError
from node.index import audit
from node.index.db import Database
from node.index.models import TrainingRunEntry
from node.training.cohort import Cohort
from node.training.policy import TrainingPolicy
from protocols.sqltypes import utcnow
from protocols.storage import write_private
from protocols.training import TrainingManifest, TrainingSample

ACCEPTED, DECLINED, PENDING = "accepted", "declined", "pending"


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: str
    manifest: Path | None = None


@dataclass(frozen=True)
class RunView:
    run: str
    status: str
    reason: str
    decided_by: str
    app_hash: str
    flower_run_id: str
    samples: int
    rounds: int
    cohort: dict[str, object]


def _entry(session: Session, run: str) -> TrainingRunEntry | None:
    return session.scalar(select(TrainingRunEntry).where(TrainingRunEntry.run == run))


def _set(
    session: Session, entry: TrainingRunEntry, status: str, reason: str, who: str, action: str
) -> None:
    changed = entry.status != status or entry.reason != reason
    entry.status, entry.reason, entry.decided_by = status, reason, who
    entry.updated_at = utcnow()
    if changed:
        audit.append(
            session,
            who,
            action,
            entry.run,
            app_hash=entry.app_hash,
            reason=reason,
            flower_run=entry.flower_run_id,
        )


def manifest_path(training_dir: Path, run: str, flower_run_id: str) -> Path:
    return training_dir / "manifests" / f"{run}-{flower_run_id}.json"


def admit(
    db: Database,
    training_dir: Path,
    policy: TrainingPolicy,
    site: str,
    run: str,
    flower_run_id: str,
    app_hash: str,
    cohort: Cohort,
    build: Callable[[Cohort], list[TrainingSample]],
) -> Admission:
    """May this run's message be handled here? If so, where its sample manifest is."""
    if not run:
        return Admission(False, "the run has no RadFed run id")
    with db.write() as session:
        entry = _entry(session, run)
        if entry is None:
            entry = TrainingRunEntry(
                run=run,
                flower_run_id=flower_run_id,
                app_hash=app_hash,
                status="new",
                cohort=json.dumps(cohort.describe()),
            )
            session.add(entry)
        entry.flower_run_id = flower_run_id
        # An operator's decline, and a run caught swapping its bundle, stick; the
        # policy's own decisions are made again on each message (the policy may change).
        if entry.status == DECLINED and entry.decided_by != "policy":
            return Admission(False, entry.reason)
        if entry.status == ACCEPTED and entry.app_hash and entry.app_hash != app_hash:
            _set(
                session,
                entry,
                DECLINED,
                "the run sent another app bundle than the one accepted",
                "gate",
                "training.decline",
            )
            return Admission(False, entry.reason)
        if app_hash not in policy.apps:
            _set(
                session,
                entry,
                DECLINED,
                f"app bundle {app_hash[:12]} is not on this site's training policy",
                "policy",
                "training.decline",
            )
            return Admission(False, entry.reason)
        if entry.status == DECLINED or (entry.status == PENDING and not policy.manual_approval):
            entry.status = "new"
        if entry.status in ("new", PENDING) and policy.manual_approval:
            _set(
                session,
                entry,
                PENDING,
                "waiting for an operator's approval",
                "policy",
                "training.pending",
            )
            return Admission(False, entry.reason)
        if entry.status == "new":
            _set(
                session,
                entry,
                ACCEPTED,
                "allowed by the training policy",
                "policy",
                "training.accept",
            )
        entry.app_hash = app_hash
    path = manifest_path(training_dir, run, flower_run_id)
    if not path.exists():
        found = build(cohort)
        manifest = TrainingManifest(run=run, site=site, app_hash=app_hash, samples=found)
        write_private(path, manifest.model_dump_json().encode("utf-8"), 0o600)
        with db.write() as session:
            entry = _entry(session, run)
            if entry is not None:
                entry.samples = len(found)
                entry.cohort = json.dumps(cohort.describe())
                audit.append(
                    session,
                    "policy",
                    "training.cohort",
                    run,
                    app_hash=app_hash,
                    flower_run=flower_run_id,
                    samples=len(found),
                    cohort=cohort.describe(),
                )
    count = TrainingManifest.model_validate_json(path.read_bytes()).samples
    if not count:
        return Admission(False, "no eligible exams on this site match the run's cohort")
    return Admission(True, "accepted", path)


def record_round(db: Database, run: str, round_: str, kind: str, samples: int) -> None:
    """Audit one message the run's app handled here (train rounds are counted)."""
    with db.write() as session:
        entry = _entry(session, run)
        if entry is None:  # pragma: no cover - admit created it
            return
        if kind == "train":
            entry.rounds += 1
        entry.updated_at = utcnow()
        audit.append(
            session,
            "training",
            f"training.{kind}",
            run,
            app_hash=entry.app_hash,
            round=round_,
            samples=samples,
            flower_run=entry.flower_run_id,
        )


def decide(db: Database, run: str, approve: bool, who: str, reason: str = "") -> RunView:
    """An operator approves or declines a run (it need not have arrived yet)."""
    if not run or len(run) > 64:
        raise NodeError("bad_run", 'Argument "run" must be a run id such as run-0001.')
    with db.write() as session:
        entry = _entry(session, run)
        if entry is None:
            entry = TrainingRunEntry(run=run, status="new")
            session.add(entry)
        if approve:
            _set(
                session,
                entry,
                ACCEPTED,
                reason or "approved by an operator",
                who,
                "training.approve",
            )
        else:
            _set(
                session,
                entry,
                DECLINED,
                reason or "declined by an operator",
                who,
                "training.decline",
            )
        session.flush()
        return _view(entry)


def _view(entry: TrainingRunEntry) -> RunView:
    return RunView(
        run=entry.run,
        status=entry.status,
        reason=entry.reason,
        decided_by=entry.decided_by,
        app_hash=entry.app_hash,
        flower_run_id=entry.flower_run_id,
        samples=entry.samples,
        rounds=entry.rounds,
        cohort=json.loads(entry.cohort or "{}"),
    )


def list_runs(db: Database) -> list[RunView]:
    with db.read() as session:
        return [
            _view(e)
            for e in session.scalars(select(TrainingRunEntry).order_by(TrainingRunEntry.id.desc()))
        ]

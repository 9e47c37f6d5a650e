"""The study lifecycle (DESIGN.md): transitions are the only way a status changes.

Every transition is checked against the table below and recorded with who, what
and when — in the study's history and in the audit log, in one transaction.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy.orm import Session

from node.errors import NodeError
from node.index import audit
from node.index.models import StatusChange, Study, utcnow
from protocols.api.node import StudyStatus as S

#: from -> the statuses it may move to. New instances arriving after a decision send
#: the study back to DEIDENTIFIED: what was vetted is no longer the whole study.
TRANSITIONS: Final[dict[S | None, frozenset[S]]] = {
    None: frozenset({S.RECEIVED}),
    S.RECEIVED: frozenset({S.DEIDENTIFIED, S.WITHDRAWN}),
    S.DEIDENTIFIED: frozenset({S.HELD, S.APPROVED, S.WITHDRAWN}),
    S.HELD: frozenset({S.APPROVED, S.REJECTED, S.DEIDENTIFIED, S.WITHDRAWN}),
    S.APPROVED: frozenset({S.QUEUED, S.HELD, S.DEIDENTIFIED, S.WITHDRAWN}),
    S.REJECTED: frozenset({S.HELD, S.DEIDENTIFIED, S.WITHDRAWN}),
    S.QUEUED: frozenset({S.SHARED, S.HELD, S.FAILED, S.DEIDENTIFIED, S.WITHDRAWN}),
    S.FAILED: frozenset({S.QUEUED, S.DEIDENTIFIED, S.WITHDRAWN}),
    S.SHARED: frozenset({S.DEIDENTIFIED, S.WITHDRAWN}),
    S.WITHDRAWN: frozenset(),
}


class LifecycleError(NodeError):
    """A transition the lifecycle does not allow."""


def can_move(current: S | None, target: S) -> bool:
    return target in TRANSITIONS[current]


def transition(session: Session, study: Study, target: S, actor: str, reason: str = "") -> None:
    """Move a study to ``target``, recording the change; raises LifecycleError if not allowed."""
    current = S(study.status) if study.status else None
    if not can_move(current, target):
        raise LifecycleError(
            "invalid_transition",
            f"study {study.study_uid}: {current.value if current else 'new'} -> "
            f"{target.value} is not an allowed transition",
        )
    now = utcnow()
    if study.id is None:
        session.add(study)
        session.flush()
    session.add(
        StatusChange(
            study_id=study.id,
            from_status=current.value if current else None,
            to_status=target.value,
            actor=actor,
            reason=reason,
            at=now,
        )
    )
    study.status = target.value
    study.status_at = now
    audit.append(
        session,
        actor,
        "study.status",
        study.study_uid,
        from_status=current.value if current else None,
        to_status=target.value,
        reason=reason,
    )
